"""glibc's heap told to hand large blocks back to the system, for commands that load a model, compute with it once
and write it (merge, export): their resident size then follows the live tensors.

glibc serves a block below its mmap threshold from its heap, and the threshold rises (up to 32 MiB) each time a
mapped block is freed, so after the first large tensors most tensors live in the heap, which only shrinks from its
top: what is freed between tensors still held stays resident. Fixed at 128 KiB, every large block is mapped and
unmapped on its own. Measured on the 1B real shape (scripts/make_real_shape.py), 2-core AMD EPYC Zen 4:
- merging an adapter: 1.44 GB held over the libraries with glibc as it comes, 0.91 GB with the threshold fixed;
- a training step (bench/allocator.py, 512 tokens, fp32, checkpointing): peak 5.00 -> 4.52 GB, but 16.3 -> 21.0
  s/step, since each step's activations are then fresh pages the kernel zeroes. Training keeps glibc's default;
  jemalloc and tcmalloc preloaded are measured there too (docs/benchmarks.md).

PHILORA_HEAP=0 leaves the heap as it is; so does a process started with another allocator preloaded (LD_PRELOAD).
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 128 * 1024  # bytes: a block this size or larger is mapped, and unmapped as soon as it is freed
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h); setting it also stops the threshold rising
SWITCH = "PHILORA_HEAP"


def limit_slack() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD for the rest of this process; False where nothing was set (not
    glibc, another allocator preloaded, PHILORA_HEAP=0)."""
    if os.environ.get(SWITCH) == "0" or not sys.platform.startswith("linux") or os.environ.get("LD_PRELOAD"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and others: no glibc
        return False
    mallopt = getattr(libc, "mallopt", None)
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
