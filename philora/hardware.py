"""What the machine can do: which device to use, whether bf16 is fast on it, and the dtype table."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

import torch

from philora.errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Overrides the CPU detection, so either path runs on any CPU (bf16 emulated where the CPU lacks it: slowly).
CPU_BF16_SWITCH = "PHILORA_CPU_BF16"


def device() -> torch.device:
    """The device this process trains on: its CUDA GPU when there is one (the LOCAL_RANK-th under
    `accelerate launch` or torchrun, which start one process per GPU), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the name config files and run.json use."""
    return str(dtype).removeprefix("torch.")


def cpu_has_fast_bf16() -> bool:
    """Whether `dtype: auto` takes bf16 on this CPU: PHILORA_CPU_BF16=0|1 when set, else the detection."""
    switch = os.environ.get(CPU_BF16_SWITCH)
    if switch is None or switch == "":
        return cpu_detects_bf16()
    if switch not in ("0", "1"):
        raise UserError(f"${CPU_BF16_SWITCH}={switch!r}: use 1 (compute in bf16) or 0 (fp32), or unset it to detect")
    return switch == "1"


@lru_cache(maxsize=1)
def cpu_detects_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices in hardware (AMX, AVX512-BF16, Arm BF16).

    Without those instructions PyTorch emulates bf16 matmul, which is several times *slower* than fp32
    (measured 6x on a 2-core AMD EPYC with AVX2 on this model's shapes, up to 100x elsewhere), so bf16 there is
    a trap rather than a speed-up.
    """
    # macOS and others have no /proc/cpuinfo: Apple silicon CPUs have no bf16 GEMM path in PyTorch worth using.
    flags = cpu_flags()
    if platform.machine() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool({"amx_bf16", "avx512_bf16"} & flags)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty where it is not there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return frozenset(flags)


def bf16_is_fast(dev: torch.device) -> bool:
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def resolve_dtype(name: str, dev: torch.device) -> torch.dtype:
    """`auto` is bf16 where the hardware computes it natively, fp32 elsewhere; other names map directly."""
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(dev) else torch.float32
    return DTYPES[name]


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident set size now (VmRSS), or its peak (VmHWM); 0 where /proc is not there.

    The peak is read from /proc rather than getrusage's ru_maxrss, which Linux carries across fork and exec: a
    process started by a large one (pytest after loading a model, a notebook) would report its parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
