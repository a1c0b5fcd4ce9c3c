"""fp32 matrix products on x86 CPUs through oneDNN, where PyTorch's `mm` calls MKL's sgemm.

On a 2-core AMD EPYC (Zen 4), MKL's sgemm reached 140-200 GFLOP/s on this model's layer shapes (1666 tokens by
576/960/1536/3072) and oneDNN's fp32 kernels 190-210, and on the LM head's 256 x 49152 chunks 113-125 against 166,
with the same fp32 arithmetic (relative error to a float64 product about 1e-6 on both). A full fp32 training step,
alternating both in one process: 185.5 -> 208.8 and 206.4 -> 226.6 tokens/s in two runs (+10-13%). bf16 products
already go to oneDNN through `mm`; other devices and dtypes, and builds without oneDNN, keep PyTorch's own.

`frozen_linear` is a frozen `nn.Linear` in training (gradient for the input only, nothing saved but the weight),
used by the fused LoRA layers for their base layer; `linear` is the product alone, for code that is already
inside an autograd function, and `linear_into` the same into a buffer (the chunked LM head).
"""

from __future__ import annotations

import platform
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F


@lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's linear kernel on an x86 CPU (Arm builds route oneDNN elsewhere)."""
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def by_onednn(x: torch.Tensor) -> bool:
    """Whether a product with `x` as its left factor goes through oneDNN: fp32 on the CPU, where it is there."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and onednn_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for 2-d `x` and (out, in) `weight` (strided views welcome), without autograd."""
    if by_onednn(x):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`linear(x, weight)` written into `out` (a buffer reused across calls); returns `out`."""
    if by_onednn(x):  # oneDNN writes a fresh tensor
        return out.copy_(linear(x, weight))
    return torch.mm(x, weight.T, out=out)


class FrozenLinear(torch.autograd.Function):
    """x @ weight.T + bias with a gradient for x only; any leading dimensions of x."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        out = linear(x.reshape(-1, x.shape[-1]), weight, bias)
        # not a view of the product: the fused LoRA adds its branch into this output in place
        return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], weight.shape[0]))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (weight,) = ctx.saved_tensors
        grad_x = linear(grad.reshape(-1, grad.shape[-1]), weight.T)
        return torch.ops.aten._unsafe_view(grad_x, (*grad.shape[:-1], weight.shape[1])), None, None


def frozen_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for a linear layer whose parameters are frozen; through oneDNN where `by_onednn`."""
    plain = type(layer) is torch.nn.Linear and not any(p.requires_grad for p in layer.parameters())
    if not (plain and by_onednn(x) and layer.weight.dtype == torch.float32):
        return layer(x)
    return FrozenLinear.apply(x, layer.weight, layer.bias)
