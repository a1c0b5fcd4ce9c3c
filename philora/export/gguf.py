"""Write a Phi-3 model as GGUF, the way llama.cpp's convert_hf_to_gguf.py does for `Phi3ForCausalLM`.

Tensors keep Phi-3's fused layout under llama.cpp's names (`blk.N.attn_qkv` = [q; k; v], `blk.N.ffn_up` = the
fused [gate; up]); Phi-3's rotary embedding is the NeoX kind llama.cpp uses for phi3, so no rows are permuted.
Norms stay f32; matrices are f16, or Q8_0 (blocks of 32 int8 values with one f16 scale) where a row splits into
whole blocks. A tied output head is not written: llama.cpp's phi3 reads the token embedding then. Long-context
models (longrope: Phi-3-*-128k, Phi-3.5, Phi-4-mini) get the `rope_factors_long/short` tensors and the
attention factor, as llama.cpp writes them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from philora.errors import UserError
from philora.export.vocab import Vocab, gguf_name

ARCH = "phi3"
TYPES = ("f16", "q8_0")


def rope_settings(config: Any) -> dict[str, Any]:
    """Rotary settings whichever way the config spells them (transformers 5 `rope_parameters`, older
    `rope_theta` + `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    merged = {**scaling, **params}
    merged.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    merged.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    merged.setdefault("rope_type", merged.get("type", "default"))
    return merged


def rope_dimensions(config: Any) -> int:
    rope = rope_settings(config)
    return int(rope["partial_rotary_factor"] * config.hidden_size) // config.num_attention_heads


def original_context(config: Any) -> int:
    rope = rope_settings(config)
    return int(
        rope.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        or config.max_position_embeddings
    )


def check_phi3(config: Any, where: str) -> None:
    architectures = getattr(config, "architectures", None) or []
    if config.model_type != ARCH:
        named = f"{config.model_type} ({', '.join(architectures)})" if architectures else config.model_type
        raise UserError(
            f"{where}: a {named} model; philora exports the Phi-3 GGUF layout only (Phi3ForCausalLM) — use "
            "llama.cpp's convert_hf_to_gguf.py for other architectures"
        )
    rope_type = rope_settings(config)["rope_type"]
    if rope_type not in ("default", "longrope", "su"):
        raise UserError(f"{where}: rope type {rope_type!r} has no GGUF form for phi3; default and longrope do")


def write_gguf(path: Path, name: str, config: Any, state: dict[str, torch.Tensor], vocab: Vocab, qtype: str) -> None:
    """The GGUF file: hyperparameters, tokenizer and tensors of one Phi-3 model."""
    import gguf

    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(gguf_name(name, vocab.rstrip_specials))
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, config)
    vocab.add_to(writer)
    for tensor_name, array, dtype in gguf_tensors(config, state, qtype):
        writer.add_tensor(tensor_name, array, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_hyperparameters(writer: Any, config: Any) -> None:
    rope = rope_settings(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(original_context(config))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(rope_dimensions(config))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_vocab_size(config.vocab_size)
    # llama.cpp tells Phi-4-style models (sliding_window set) from the others by a zero here.
    writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    if rope["rope_type"] in ("longrope", "su"):
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(config))


def longrope_attention_factor(config: Any) -> float:
    rope = rope_settings(config)
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    scale = config.max_position_embeddings / original_context(config)
    return math.sqrt(1 + math.log(scale) / math.log(original_context(config))) if scale > 1 else 1.0


def gguf_tensors(config: Any, state: dict[str, torch.Tensor], qtype: str) -> list[tuple[str, np.ndarray, Any]]:
    """(GGUF name, data, GGML type) for every weight, in llama.cpp's order of names."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, config.num_hidden_layers)
    out = []
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise UserError(f"the model has a tensor {hf_name} that the Phi-3 GGUF layout has no place for")
        out.append((f"{gguf_name}.{suffix}", *encode(tensor, qtype)))
    out.extend(rope_factor_tensors(config))
    return out


def encode(tensor: torch.Tensor, qtype: str) -> tuple[np.ndarray, Any]:
    """A tensor as llama.cpp's converter stores it: vectors f32, matrices f16 or Q8_0."""
    import gguf

    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim < 2:
        return data, gguf.GGMLQuantizationType.F32
    if qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data, q8), q8
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def rope_factor_tensors(config: Any) -> list[tuple[str, np.ndarray, Any]]:
    import gguf

    rope = rope_settings(config)
    if rope["rope_type"] not in ("longrope", "su"):
        return []
    long, short = rope.get("long_factor"), rope.get("short_factor")
    half = rope_dimensions(config) // 2
    if not long or not short or len(long) != half or len(short) != half:
        raise UserError(f"config.json: longrope needs long_factor and short_factor of {half} values each")
    f32 = gguf.GGMLQuantizationType.F32
    return [
        (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.asarray(long, np.float32), f32),
        (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.asarray(short, np.float32), f32),
    ]
