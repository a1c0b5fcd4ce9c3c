"""What the machine can do: which device to use and whether bf16 is fast on it."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def device() -> torch.device:
    """The device this process trains on: its CUDA GPU when there is one (the LOCAL_RANK-th under
    `accelerate launch` or torchrun, which start one process per GPU), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices in hardware (AMX, AVX512-BF16, Arm BF16).

    Without those instructions PyTorch emulates bf16 matmul, which is several times *slower* than fp32
    (measured 7-100x on AVX2 machines), so bf16 there is a trap rather than a speed-up.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        # macOS and others: Apple silicon CPUs have no bf16 GEMM path in PyTorch worth using.
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    if platform.machine() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def bf16_is_fast(dev: torch.device) -> bool:
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def resolve_dtype(name: str, dev: torch.device) -> torch.dtype:
    """`auto` is bf16 where the hardware computes it natively, fp32 elsewhere; other names map directly."""
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(dev) else torch.float32
    return DTYPES[name]
