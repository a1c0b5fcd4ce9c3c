"""Attention over packed rows one sample at a time: causal SDPA on each sample, no mask.

A packed row holds several samples that must not attend to each other. Given only restarting position ids,
transformers builds a block-diagonal causal mask over the whole row and SDPA computes every (query, key) pair
of it, masked or not; with a mask its kernels cannot skip the causal half either. Attending within each sample
with `is_causal` costs the sum of the samples' squared lengths instead of the row's, halved by causality: on
the embedded model's rows of 512 tokens, fwd+bwd per layer went from 61 to 42 ms in bf16 on a 2-core EPYC. It
is what makes one flat row per micro-batch (no padding, see train.objective) affordable. On a CPU without AMX,
bf16 attention is computed in fp32 (see `upcast`).

The samples' boundaries come as flash-attention's varlen arguments (`cu_seq_lens_q`: 0, end of sample 1, ...,
the row's length), which `model.loss.TokenLoss` passes for a flat row; transformers' flash_attention_2 reads the
same arguments. Every other call (evaluation batches, generation with a cache, a sliding window shorter than a
sample) goes to transformers' own SDPA with the mask it built.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from philora import hardware

NAME = "philora_sdpa"  # the attention implementation a model trains with when its config asks for sdpa


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
    dtype = query.dtype
    if upcast(query):
        query, key, value = query.float(), key.float(), value.float()
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    parts = [
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
    ]
    return torch.cat(parts, dim=2).to(dtype).transpose(1, 2).contiguous(), None


def upcast(query: torch.Tensor) -> bool:
    """Whether bf16 attention runs in fp32: on a CPU without AMX, PyTorch's flash-attention kernel is faster in
    fp32 than in bf16, casts included (a 420-token sample, 9 heads: 12.4 against 17.4 ms fwd+bwd on a 2-core
    EPYC with AVX512-BF16); AMX's tile kernels and GPUs keep bf16."""
    return query.dtype == torch.bfloat16 and query.device.type == "cpu" and "amx_bf16" not in hardware.cpu_flags()


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
