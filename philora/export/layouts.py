"""The model architectures GGUF export writes, and how each maps onto llama.cpp's layout.

One entry per Hugging Face `model_type`, with the facts llama.cpp's convert_hf_to_gguf.py applies to it:
- phi3 (Phi-3, Phi-3.5, Phi-4-mini): GGUF arch `phi3`, fused `attn_qkv` and `ffn_up` ([gate; up]) as stored,
  NeoX rotary (no rows permuted), longrope factors as tensors.
- llama and mistral: GGUF arch `llama`. llama.cpp rotates adjacent pairs where transformers rotates the two halves
  of each head, so the rows of q_proj and k_proj are reordered per head (`permute_rotary`). Linear and llama3
  rope scaling are written as llama.cpp reads them (a `rope_freqs` tensor for llama3).
- qwen2: GGUF arch `qwen2`, NeoX rotary, q/k/v biases.
Anything else is refused, naming these. A tied output head is not written: every one of these reads the token
embedding then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from philora.errors import UserError


@dataclass(frozen=True)
class Layout:
    arch: str  # GGUF general.architecture
    permutes_rotary: bool  # q/k rows reordered from half-split to pair-interleaved rotary
    rope_types: tuple[str, ...]  # rope types it can carry


LAYOUTS = {
    "phi3": Layout("phi3", permutes_rotary=False, rope_types=("default", "longrope", "su")),
    "llama": Layout("llama", permutes_rotary=True, rope_types=("default", "linear", "llama3")),
    "mistral": Layout("llama", permutes_rotary=True, rope_types=("default", "linear")),
    "qwen2": Layout("qwen2", permutes_rotary=False, rope_types=("default",)),
}
SUPPORTED = "Phi-3/Phi-3.5/Phi-4-mini (phi3), Llama and Mistral (llama), Qwen2 (qwen2)"


def layout_of(config: Any, where: str) -> Layout:
    """The layout of `config`'s architecture, or a UserError naming what export supports."""
    layout = LAYOUTS.get(config.model_type)
    if layout is None:
        architectures = getattr(config, "architectures", None) or []
        named = f"{config.model_type} ({', '.join(architectures)})" if architectures else config.model_type
        raise UserError(
            f"{where}: a {named} model; GGUF export supports {SUPPORTED} — for others use llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    rope_type = rope_settings(config)["rope_type"]
    if rope_type not in layout.rope_types:
        raise UserError(
            f"{where}: rope type {rope_type!r} has no GGUF form here for {config.model_type}; "
            f"{', '.join(layout.rope_types)} do"
        )
    return layout


def rope_settings(config: Any) -> dict[str, Any]:
    """Rotary settings whichever way the config spells them (transformers 5 `rope_parameters`, older
    `rope_theta` + `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    merged = {**scaling, **params}
    merged.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    merged.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    merged.setdefault("rope_type", merged.get("type", "default"))
    return merged


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rope_dimensions(config: Any) -> int:
    return int(float(rope_settings(config)["partial_rotary_factor"]) * head_dim(config))


def original_context(config: Any) -> int:
    rope = rope_settings(config)
    return int(
        rope.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        or config.max_position_embeddings
    )


def is_longrope(config: Any) -> bool:
    return rope_settings(config)["rope_type"] in ("longrope", "su")


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or of a LoRA B feeding one) from transformers' half-split rotary order to the
    adjacent-pair order llama.cpp's llama arch rotates: within each head, rows [x0..x(d/2-1), y0..] → x0 y0 x1 y1."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def transform(config: Any, layout: Layout, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A weight as llama.cpp expects it under its GGUF name (LoRA B matrices take the same row transform)."""
    if layout.permutes_rotary and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_rotary(tensor, config.num_attention_heads)
    if layout.permutes_rotary and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_rotary(tensor, config.num_key_value_heads or config.num_attention_heads)
    return tensor


def longrope_attention_factor(config: Any) -> float:
    rope = rope_settings(config)
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    scale = config.max_position_embeddings / original_context(config)
    return math.sqrt(1 + math.log(scale) / math.log(original_context(config))) if scale > 1 else 1.0


def llama3_rope_factors(config: Any) -> np.ndarray:
    """Llama 3.1's frequency scaling as per-frequency divisors (llama.cpp's `rope_freqs`): wavelengths shorter
    than original/high_freq_factor keep their frequency, longer than original/low_freq_factor are slowed by
    `factor`, and those between are blended smoothly."""
    rope = rope_settings(config)
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    dims = head_dim(config)
    inv_freq = 1.0 / float(rope["rope_theta"]) ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    out = []
    for wavelength in 2 * math.pi / inv_freq:
        if wavelength < old / high:
            out.append(1.0)
        elif wavelength > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
