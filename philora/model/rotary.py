"""Phi-3's attention in training with the rotary embedding applied by one autograd function.

Phi-3 projects queries, keys and values with one matrix (qkv_proj). transformers slices its output into three
views and rotates queries and keys with two multiplies, a concatenation (`rotate_half`) and an add, each a pass and
a fresh tensor, as many again in backward; backward then builds the projection's gradient from three zero-filled
slices added together. `RotaryQKV` rotates queries and keys in one pass each (a multiply and a fused
multiply-add per half), straight from the projection's output, and in backward writes the three gradients into
one tensor, rotated back. Values are transformers' `apply_rotary_pos_emb` (the first cos.shape[-1] dimensions of
each head rotated, as in Phi-4-mini's partial rotary) up to rounding: in bf16 a product and a sum are rounded
once together instead of one by one.

`install` routes Phi3Attention modules through it while they train without a cache; evaluation and generation
run transformers' own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Into `out`: x * cos + rotate_half(x) * sin on the first cos.shape[-1] dimensions of x, the rest as they are;
    with `inverse`, the transposed map (the gradient's way back), where rotate_half(x) = (-x2, x1) becomes (x2, -x1)."""
    half = cos.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :half], x[..., half : 2 * half], out[..., :half], out[..., half : 2 * half]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    sign = -1 if inverse else 1
    torch.mul(x1, c1, out=o1).addcmul_(x2, s2 if inverse else s1, value=-sign)
    torch.mul(x2, c2, out=o2).addcmul_(x1, s1 if inverse else s2, value=sign)
    if 2 * half < x.shape[-1]:
        out[..., 2 * half :] = x[..., 2 * half :]
    return out


class RotaryQKV(torch.autograd.Function):
    """(batch, tokens, (heads + 2 kv heads) x dim) projection → rotated queries (batch, heads, tokens, dim), rotated
    keys and values (batch, kv heads, tokens, dim); the gradient for the projection only."""

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        query, key, value = qkv.unflatten(-1, (heads + 2 * kv_heads, -1)).split([heads, kv_heads, kv_heads], -2)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (batch, tokens, 1, rotated dims): the same for every head
        # each head's tokens contiguous, as attention kernels read them (and transformers' rotation leaves them)
        query, key = (rotate(t, cos, sin, t.new_empty(t.transpose(1, 2).shape).transpose(1, 2), inverse=False)
                      for t in (query, key))  # fmt: skip
        ctx.save_for_backward(cos, sin)
        ctx.heads = heads, kv_heads
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        heads, kv_heads = ctx.heads
        first = next(g for g in grads if g is not None)
        grad = first.new_empty(first.shape[0], first.shape[2], heads + 2 * kv_heads, first.shape[3])
        parts = grad.split([heads, kv_heads, kv_heads], -2)
        for i, (part, upstream) in enumerate(zip(parts, grads, strict=True)):
            if upstream is None:
                part.zero_()
            elif i < 2:
                rotate(upstream.transpose(1, 2), cos, sin, part, inverse=True)
            else:
                part.copy_(upstream.transpose(1, 2))
        return grad.flatten(-2), None, None, None, None


def fused_forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """A Phi3Attention's forward with `RotaryQKV` while training without a cache; otherwise its own."""
    cos_sin = kwargs.get("position_embeddings")
    if (
        not self.training
        or args
        or cos_sin is None
        or kwargs.get("cache") is not None
        or kwargs.get("past_key_values") is not None
    ):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.phi3.modeling_phi3 import eager_attention_forward

    rest = {k: v for k, v in kwargs.items() if k not in ("position_embeddings", "attention_mask", "cache",
                                                             "past_key_values")}  # fmt: skip
    heads = self.config.num_attention_heads
    query, key, value = RotaryQKV.apply(self.qkv_proj(hidden_states), *cos_sin, heads, self.num_key_value_heads)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = attend(self, query, key, value, kwargs.get("attention_mask"), dropout=self.attention_dropout,
                          scaling=self.scaling, sliding_window=getattr(self.config, "sliding_window", None),
                          **rest)  # fmt: skip
    return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def install(model: torch.nn.Module) -> int:
    """Route every Phi3Attention of `model` through `fused_forward`; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "Phi3Attention":
            module.forward = types.MethodType(fused_forward, module)
            count += 1
    return count
