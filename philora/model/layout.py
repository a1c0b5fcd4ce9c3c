"""Phi-3's fused projections, in one table that every other module asks.

Phi-3 keeps the attention's q, k and v in one `qkv_proj` and the MLP's gate and up in one `gate_up_proj`, their
output rows stacked in that order. Llama-layout models (and the CookBook's target lists) name the parts
`q_proj, k_proj, v_proj, gate_proj, up_proj`; philora's slice syntax names them `qkv_proj:q,v`.
"""

from __future__ import annotations

from typing import Any

# fused module -> its parts as the unfused layout names them, in row order
FUSED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
# where each fused module sits inside a decoder layer
PARENT = {"qkv_proj": "self_attn", "gate_up_proj": "mlp"}
# unfused part -> the fused module that holds it (q_proj -> qkv_proj)
FUSED_HOME = {part: fused for fused, parts in FUSED.items() for part in parts}
# fused module -> its slice names for `qkv_proj:q,v` (q, k, v; gate, up)
SLICES = {fused: tuple(part.removesuffix("_proj") for part in parts) for fused, parts in FUSED.items()}


def part_rows(config: Any) -> dict[str, dict[str, int]]:
    """Output rows of each part inside its fused module, from a model config (grouped-query attention aware):
    {"qkv_proj": {"q_proj": ..., "k_proj": ..., "v_proj": ...}, "gate_up_proj": {...}}."""
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = (kv_heads or heads) * head_dim
    rows = {"q_proj": heads * head_dim, "k_proj": kv, "v_proj": kv, "gate_proj": config.intermediate_size,
            "up_proj": config.intermediate_size}  # fmt: skip
    return {fused: {part: rows[part] for part in parts} for fused, parts in FUSED.items()}
