"""One autograd function for a peft LoRA branch in training: dropout, A, B and the add to the base output.

peft computes `result + lora_B(lora_A(dropout(x))) * scaling` as separate modules: the input cast to the
adapter's fp32 weights and back by autocast, a dropout mask drawn one element at a time from PyTorch's Mersenne
Twister (on a 2-core CPU in bf16, 15-22% of a step), a multiply, the scaling pass and the add. `lora_delta`
computes the same value in the base output's dtype with the adapter weights cast once (they are tiny), the
dropout scale folded into A and the scaling into B, and the add done by the last matmul (addmm). Its backward is
written out: the gradients of A and B come back in their own (fp32) dtype, as autocast's casts would give them.

Dropout keeps its meaning: each element of each adapted input is zeroed independently with probability p and the
rest scaled by 1/(1-p). On the CPU, `dropped_positions` draws where the zeroed elements are rather than a mask:
in such a sequence the gaps between zeroed elements are geometric, so p = 0.05 takes one uniform draw per twenty
elements instead of random bits for each, and zeroing (forward, and the input gradient in backward) touches only
those positions. On other devices a mask is drawn, 16 bits an element, and p taken to the nearest 1/65536; the
scale uses the probability as drawn, so the expected input is unchanged. Draws come from torch's default
generator, so `torch.manual_seed`, checkpoint resume and non-reentrant gradient checkpointing (which replays the
RNG) still reproduce them; they are not the masks peft's `nn.Dropout` would draw from the same seed.

`install` puts it on every vanilla LoRA linear layer of a peft model, for training, on plain linear layers and on
bitsandbytes' 8-bit and 4-bit ones alike (QLoRA on a 2-core EPYC in bf16: 271 -> 357 tokens/s; peft's dropout
there was 17% of the step): in eval mode, and in any other state (merged, adapters disabled, several active
adapters, DoRA, LoRA bias, a mixed-adapter batch), a layer runs peft's own forward, so evaluation inside a run
computes as `philora eval` does after it.
"""

from __future__ import annotations

import math
import sys
import types
from typing import Any

import torch

from philora.model import cpu_matmul

LEVELS = 1 << 16  # the dropout probability's resolution for masks (other devices than the CPU): 16-bit integers


def draw_dropout(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(which elements of a `shape` tensor dropout zeroes, the probability of zeroing one as drawn): on the CPU their
    flat positions (`dropped_positions`); elsewhere a bool mask, 16 random bits an element from 64-bit draws."""
    if device.type in ("cpu", "meta"):
        return dropped_positions(shape.numel(), p, device), p
    return dropped_mask(shape, p, device)


def dropped_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(bool mask of the elements dropout zeroes, the probability of zeroing one as drawn): 16 random bits an
    element, four elements per 64-bit draw, p to the nearest 1/65536."""
    # the full 64-bit range: a plain random_() leaves every word's sign bit, one element in four, at zero
    words = torch.empty((shape.numel() + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    bits = words.view(torch.int16)[: shape.numel()].view(shape)
    threshold = round(p * LEVELS)  # int16 spans [-32768, 32767]: drop the `threshold` lowest values
    return bits < threshold - LEVELS // 2, threshold / LEVELS


def dropped_positions(numel: int, p: float, device: torch.device) -> torch.Tensor:
    """The flat positions, ascending, that dropout zeroes among `numel` elements, each with probability p on its own.

    The gaps between them are then geometric, P(gap = k) = (1-p)^(k-1) p, drawn as floor(log(1-u) / log(1-p)) + 1
    from uniform fp32 u (its 2^-24 steps move each probability by less than 1e-7)."""
    expected = numel * p
    if device.type == "meta":  # the memory estimate's pass: as many as expected, in as large a buffer as drawn
        return torch.empty(gap_draws(expected), dtype=torch.int64, device=device)[: round(expected)]
    rate = math.log1p(-p)
    chunks, last = [], -1
    while last < numel - 1:
        uniform = torch.rand(gap_draws((numel - 1 - last) * p), device=device)
        gaps = uniform.neg_().log1p_().div_(rate).to(torch.int64).add_(1)
        chunks.append(gaps.cumsum_(0).add_(last))
        last = int(chunks[-1][-1])
    positions = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return positions[: int(torch.searchsorted(positions, numel))]


def gap_draws(expected: float) -> int:
    """How many gaps to draw for `expected` zeroed elements: too few with probability < 1e-15 (then drawn on)."""
    return int(expected + 8 * math.sqrt(expected) + 64)


def zero_dropped_(t: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Zero in place the elements of contiguous `t` that `draw_dropout` chose; returns `t`."""
    if dropped.dtype == torch.bool:
        return t.masked_fill_(dropped, 0)
    t.view(-1).index_fill_(0, dropped, 0)
    return t


class LoraDelta(torch.autograd.Function):
    """base + scaling * dropout(x) @ A.T @ B.T, computed in base's dtype; gradients for base, x, A and B."""

    @staticmethod
    def forward(ctx: Any, base: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                scaling: float, p: float, in_place: bool) -> torch.Tensor:  # fmt: skip
        dtype = base.dtype
        flat = x.reshape(-1, x.shape[-1])
        a = weight_a.to(dtype)
        dropped, a_scale = None, 1.0
        if p > 0:
            dropped, drawn = draw_dropout(flat.shape, p, flat.device)
            flat = zero_dropped_(flat.to(dtype, memory_format=torch.contiguous_format, copy=True), dropped)
            a_scale = 1 / (1 - drawn)
            a = a * a_scale
        else:
            flat = flat.to(dtype)
        b = weight_b.to(dtype)
        hidden = flat @ a.T  # (tokens, r)
        ctx.save_for_backward(flat, hidden, a, b, dropped)
        ctx.scaling, ctx.a_scale, ctx.x_shape = scaling, a_scale, x.shape
        ctx.dtypes = x.dtype, weight_a.dtype, weight_b.dtype
        if in_place and base.is_contiguous():  # one pass less than a new output
            base.view(-1, base.shape[-1]).addmm_(hidden, b.T, alpha=scaling)
            ctx.mark_dirty(base)
            return base
        out = torch.addmm(base.reshape(-1, base.shape[-1]), hidden, b.T, alpha=scaling)
        return torch.ops.aten._unsafe_view(out, base.shape)  # not a view: later layers may work on it in place

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, hidden, a, b, dropped = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        g = grad.reshape(-1, grad.shape[-1]).to(b.dtype)
        grad_hidden = (g @ b) * ctx.scaling  # (tokens, r)
        grad_b = (g.T @ hidden * ctx.scaling).to(b_dtype) if ctx.needs_input_grad[3] else None
        grad_a = (grad_hidden.T @ flat * ctx.a_scale).to(a_dtype) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = grad_hidden @ a
            if dropped is not None:
                zero_dropped_(grad_x, dropped)
            grad_x = grad_x.to(x_dtype).view(ctx.x_shape)
        return grad, grad_x, grad_a, grad_b, None, None, None


def lora_delta(base: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, scaling: float,
               p: float, in_place: bool = False) -> torch.Tensor:  # fmt: skip
    """base + scaling * (dropout_p(x) @ weight_a.T) @ weight_b.T in base's dtype; gradients in each input's dtype.
    With `in_place`, the sum is written into `base` (a tensor nothing else uses, such as a layer's fresh output)."""
    return LoraDelta.apply(base, x, weight_a, weight_b, scaling, p, in_place)


def fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft lora.Linear's forward with its one active vanilla adapter through `lora_delta`; any other state
    through peft's own forward."""
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (
        not self.training  # evaluation and generation compute as a model loaded for inference does
        or args
        or kwargs
        or self.disable_adapters
        or self.merged
        or name is None
        or name not in self.lora_A
        or name in self.lora_variant
        or self.lora_bias.get(name)
    ):
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    base = cpu_matmul.frozen_linear(self.base_layer, x)
    # a plain linear layer's output is a fresh tensor, which the branch is added into; a quantized layer's is
    # left alone (peft clones it before adding, as some versions of bitsandbytes returned a view)
    in_place = type(self.base_layer) is torch.nn.Linear
    return lora_delta(base, x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p, in_place)


def lora_linear_classes() -> tuple[type, ...]:
    """peft's LoRA layers whose forward is base_layer(x) + the branch: on a linear layer, and on bitsandbytes'
    8-bit and 4-bit ones where bitsandbytes is installed (QLoRA)."""
    from peft.tuners.lora import Linear

    # peft imports its bitsandbytes wrappers when it wraps a quantized layer; importing them here instead, while
    # train.run hides bitsandbytes from an unquantised run, would leave peft a module without them for later
    wrappers = sys.modules.get("peft.tuners.lora.bnb")
    quantized = (getattr(wrappers, name, None) for name in ("Linear8bitLt", "Linear4bit"))
    return (Linear, *(cls for cls in quantized if cls is not None))


def install(peft_model: Any) -> int:
    """Route every peft LoRA linear layer of `peft_model` (plain, 8-bit or 4-bit) through `fused_forward`; returns
    how many."""
    classes = lora_linear_classes()
    count = 0
    for module in peft_model.modules():
        if isinstance(module, classes):
            module.forward = types.MethodType(fused_forward, module)
            count += 1
    return count
