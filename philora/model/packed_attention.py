"""Attention over packed rows one sample at a time: causal attention on each sample, no mask.

A packed row holds several samples that must not attend to each other. Given only restarting position ids,
transformers builds a block-diagonal causal mask over the whole row and SDPA computes every (query, key) pair
of it, masked or not; with a mask its kernels cannot skip the causal half either. Attending within each sample
costs the sum of the samples' squared lengths instead of the row's: on the embedded model's rows of 512 tokens,
fwd+bwd per layer went from 61 to 42 ms in bf16 on a 2-core EPYC. It is what makes one flat row per micro-batch
(no padding, see train.objective) affordable.

How a sample attends depends on the hardware (see `by_matmul`): on a CPU in fp32, or in bf16 with bf16
arithmetic but no AMX, samples of up to MATMUL_LONGEST tokens go through `CausalAttention` (batched matmuls);
everything else through SDPA with `is_causal`, whose CPU flash kernel runs in fp32 on a CPU without AMX.

The samples' boundaries come as flash-attention's varlen arguments (`cu_seq_lens_q`: 0, end of sample 1, ...,
the row's length), which `model.loss.TokenLoss` passes for a flat row; transformers' flash_attention_2 reads the
same arguments. Every other call (evaluation batches, generation with a cache, a sliding window shorter than a
sample) goes to transformers' own SDPA with the mask it built.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from philora import hardware

NAME = "philora_sdpa"  # the attention implementation a model trains with when its config asks for sdpa
# The longest sample `CausalAttention` takes: it keeps each sample's probabilities (5/8 of heads x length^2 at 512
# tokens) for backward, which at 512 is about what the rest of the layer keeps for them; beyond, the flash kernel's
# memory stays linear in the length and its speed catches up (2048 tokens in one block: 154 ms against 209).
MATMUL_LONGEST = 512
# `CausalAttention`'s queries per block by dtype, each block skipping the keys after its last query. Fwd+bwd of a
# row of 4 samples (1,560 tokens, 9 heads over 3) on a 2-core EPYC with AVX512-BF16: bf16 43.0 ms in blocks of 128,
# 50.4 in 64, 45.3 in 192 (a 451-token sample: 11.5 ms in one block, 6.8 in 128); fp32 52.0 ms in blocks of 64,
# 56.2 in 128, 62.2 in 32, against 65.4 by the flash kernel.
QUERY_BLOCK = {torch.float32: 64, torch.bfloat16: 128}


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                sliding_window: int | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """(batch 1, heads, tokens, dim) queries of samples laid end to end → (1, tokens, heads, dim) outputs."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = None
    if cu_seq_lens_q is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2] and not dropout:
        lengths = cu_seq_lens_q.diff().tolist()
        if sliding_window is not None and max(lengths) > sliding_window:
            lengths = None
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)  # fmt: skip
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    parts = [
        causal_attention(q, k, v, scale)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of one sample: (1, heads, tokens, dim) queries, (1, kv heads, tokens, dim) keys and values
    (each serving heads / kv heads consecutive query heads) → (1, heads, tokens, dim) in the query's dtype."""
    if by_matmul(query):
        return CausalAttention.apply(query, key, value, scale)
    dtype = query.dtype
    if bf16_without_amx(dtype, query.device.type):
        # PyTorch's CPU flash kernel is faster in fp32 than in bf16 without AMX, casts included (a 420-token
        # sample, 9 heads: 12.4 against 17.4 ms fwd+bwd on a 2-core EPYC with AVX512-BF16)
        query, key, value = query.float(), key.float(), value.float()
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale).to(dtype)


def by_matmul(query: torch.Tensor) -> bool:
    """Whether a sample attends through `CausalAttention`: up to MATMUL_LONGEST tokens, where `matmul_attention`."""
    return query.shape[2] <= MATMUL_LONGEST and matmul_attention(query.dtype, query.device.type)


def matmul_attention(dtype: torch.dtype, device_type: str) -> bool:
    """Whether short samples attend by matmuls: on a CPU in fp32, where the flash kernel's own small products are
    slower than fp32 matmuls (a row of 4 samples, 1,560 tokens: 52.0 against 65.4 ms fwd+bwd on a 2-core EPYC;
    a whole fp32 training step 2-4% faster); and in bf16 on a CPU whose bf16 arithmetic has no AMX, where PyTorch's
    flash kernel has no fast bf16 path and its fp32 one is slower than bf16 matmuls (a 451-token sample, 9 heads
    over 3: 8.1 against 13.6 ms). AMX's tile kernels inside the flash kernel, and GPUs' fused kernels, keep SDPA."""
    fp32 = dtype == torch.float32 and device_type == "cpu"
    return fp32 or (bf16_without_amx(dtype, device_type) and hardware.cpu_detects_bf16())


def bf16_without_amx(dtype: torch.dtype, device_type: str) -> bool:
    """bf16 on a CPU without AMX, where PyTorch's flash kernel has no fast bf16 path."""
    return dtype == torch.bfloat16 and device_type == "cpu" and "amx_bf16" not in hardware.cpu_flags()


class CausalAttention(torch.autograd.Function):
    """softmax(scale * Q K^T + causal mask) V for one sample by batched matmuls, in the inputs' dtype with the
    softmax and its gradient accumulated in fp32 (as PyTorch's reduced-precision softmax does). The query heads
    that share a key/value head are stacked into one matrix, so each pass is one matmul per key/value head and
    keys and values are never repeated. Queries go in blocks (`query_blocks`), each against the keys up to its
    last query only (a 512-token sample in blocks of 128 computes 5/8 of the scores). The probabilities are kept
    for backward."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        kv_heads, length, dim = key.shape[1:]
        heads = query[0].unflatten(0, (kv_heads, -1))  # (kv heads, groups, tokens, dim)
        out = query.new_empty(heads.shape)
        kept = []
        with torch.autocast(query.device.type, enabled=False):
            for start, end in query_blocks(length, query.dtype):
                stacked = heads[:, :, start:end].reshape(kv_heads, -1, dim)  # (kv heads, groups x block, dim)
                bias = causal_bias(start, end, heads.shape[1], query.dtype, query.device)
                scores = torch.baddbmm(bias, stacked, key[0, :, :end].transpose(1, 2), alpha=scale)
                probs = torch.softmax(scores, dim=-1)
                out[:, :, start:end] = torch.bmm(probs, value[0, :, :end]).view(*heads.shape[:2], end - start, dim)
                kept += [stacked, probs]
        ctx.save_for_backward(key, value, *kept)
        ctx.scale = scale
        return out.view(query.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        key, value, *kept = ctx.saved_tensors
        kv_heads, length, dim = key.shape[1:]
        grad = grad[0].unflatten(0, (kv_heads, -1))
        grad_query = torch.empty_like(grad)
        total = torch.promote_types(key.dtype, torch.float32)  # summed over the blocks in fp32 at least, rounded once
        grad_key, grad_value = (torch.zeros(t.shape[1:], dtype=total, device=t.device) for t in (key, value))
        for (start, end), stacked, probs in zip(query_blocks(length, key.dtype), kept[0::2], kept[1::2], strict=True):
            block = grad[:, :, start:end].reshape(kv_heads, -1, dim)
            grad_value[:, :end] += torch.bmm(probs.transpose(1, 2), block)
            scores = torch.bmm(block, value[0, :, :end].transpose(1, 2))
            grad_scores = torch._softmax_backward_data(scores, probs, -1, probs.dtype)
            grad_query[:, :, start:end] = torch.bmm(grad_scores, key[0, :, :end]).view(*grad.shape[:2], -1, dim)
            grad_key[:, :end] += torch.bmm(grad_scores.transpose(1, 2), stacked)
        grad_query, grad_key = grad_query.mul_(ctx.scale), grad_key.mul_(ctx.scale).to(key.dtype)
        return grad_query.view(1, -1, length, dim), grad_key[None], grad_value.to(value.dtype)[None], None


def query_blocks(length: int, dtype: torch.dtype) -> list[tuple[int, int]]:
    """(start, end) of each block of queries, QUERY_BLOCK[dtype] long (bf16's for dtypes it does not list) but
    for the last."""
    size = QUERY_BLOCK.get(dtype, QUERY_BLOCK[torch.bfloat16])
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def kept_probabilities(length: int, dtype: torch.dtype) -> int:
    """The most probabilities per head `CausalAttention` keeps for a flat row of `length` tokens in `dtype`: the
    row as samples of MATMUL_LONGEST tokens (longer ones go to SDPA, shorter ones keep less for their tokens) and
    the rest."""
    longest = min(length, MATMUL_LONGEST)
    samples = (longest, length % longest)
    per_sample = [sum((end - start) * end for start, end in query_blocks(n, dtype)) for n in samples]
    return length // longest * per_sample[0] + per_sample[1]


@lru_cache(maxsize=32)
def causal_bias(start: int, end: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(groups x (end - start), end): for the queries at positions start..end-1 of `groups` stacked heads, 0 where
    a query may see a key, -inf where the key comes after it."""
    bias = torch.full((end - start, end), float("-inf"), dtype=dtype, device=device).triu_(start + 1)
    return bias.repeat(groups, 1)


def register() -> None:
    """Make NAME a transformers attention implementation, with SDPA's mask (used when it falls back)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def varlen_arguments(position_ids: torch.Tensor) -> dict[str, Any]:
    """flash-attention's varlen arguments for one flat row of samples whose positions restart at 0; none for a row
    that does not start at position 0 (not a row of whole samples), which then attends through the mask."""
    if position_ids.shape[1] == 0 or int(position_ids[0, 0]) != 0:
        return {}
    starts = (position_ids[0] == 0).nonzero().flatten()
    bounds = torch.cat([starts, starts.new_tensor([position_ids.shape[1]])]).to(torch.int32)
    longest = int(bounds.diff().max())
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def flat_rows(model: Any) -> bool:
    """Whether a micro-batch for this model should be one flat row of samples (no padding): its attention
    takes the samples' boundaries instead of a mask over the whole row."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return getattr(config, "_attn_implementation", None) in (NAME, "flash_attention_2")
