"""Write a model as GGUF, the way llama.cpp's convert_hf_to_gguf.py does for its architecture (see layouts.py).

Norms and other vectors stay f32. Matrices are written by gguf-py in the requested float or simple type: f16,
bf16, or Q8_0 (blocks of 32 int8 values with one f16 scale) where a row splits into whole blocks, else f16.
The k-quant and 4-bit types are not written here: `quantize.py` has llama.cpp's own quantizer make them from
an f16 file written here. Long-context Phi models (longrope: Phi-3-*-128k, Phi-3.5, Phi-4-mini) get the
`rope_factors_long/short` tensors and the attention factor, Llama 3.1-style models a `rope_freqs` tensor, as
llama.cpp writes them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from philora.errors import UserError
from philora.export import layouts
from philora.export.layouts import Layout
from philora.export.vocab import Vocab

WRITTEN_HERE = ("f32", "f16", "bf16", "q8_0")


def ggml_type(name: str) -> Any:
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


def write_gguf(path: Path, name: str, config: Any, state: dict[str, torch.Tensor], vocab: Vocab, qtype: str) -> None:
    """The GGUF file: hyperparameters, tokenizer and tensors of one model, matrices in `qtype`."""
    import gguf

    layout = layouts.layout_of(config, str(path))
    writer = gguf.GGUFWriter(str(path), layout.arch)
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType["ALL_F32" if qtype == "f32" else f"MOSTLY_{qtype.upper()}"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, config, layout)
    vocab.add_to(writer)
    for tensor_name, array, dtype in gguf_tensors(config, layout, state, qtype):
        writer.add_tensor(tensor_name, array, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_hyperparameters(writer: Any, config: Any, layout: Layout) -> None:
    import gguf

    rope = layouts.rope_settings(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(layouts.rope_dimensions(config))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_vocab_size(config.vocab_size)
    if layouts.head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(layouts.head_dim(config))
        writer.add_value_length(layouts.head_dim(config))
    if layout.arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(layouts.original_context(config))
        # llama.cpp tells Phi-4-style models (sliding_window set) from the others by a zero here.
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    if layouts.is_longrope(config):
        writer.add_rope_scaling_attn_factors(layouts.longrope_attention_factor(config))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def gguf_tensors(
    config: Any, layout: Layout, state: dict[str, torch.Tensor], qtype: str
) -> list[tuple[str, np.ndarray, Any]]:
    """(GGUF name, data, GGML type) for every weight, in llama.cpp's order of names."""
    out = []
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensor = layouts.transform(config, layout, hf_name, tensor)
        out.append((tensor_name(config, layout, hf_name), *encode(tensor, qtype)))
    out.extend(rope_tensors(config))
    return out


def tensor_name(config: Any, layout: Layout, hf_name: str) -> str:
    """`model.layers.3.self_attn.qkv_proj.weight` → `blk.3.attn_qkv.weight` for this layout."""
    base, _, suffix = hf_name.rpartition(".")
    name = name_map(layout.arch, config.num_hidden_layers).get_name(base)
    if name is None:
        raise UserError(f"the model has a tensor {hf_name} that the {layout.arch} GGUF layout has no place for")
    return f"{name}.{suffix}"


@functools.cache
def name_map(arch_name: str, blocks: int) -> Any:
    """gguf-py's HF → GGUF tensor names for an architecture (built once: it spells out every block's names)."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    return gguf.get_tensor_name_map(arch, blocks)


def encode(tensor: torch.Tensor, qtype: str) -> tuple[np.ndarray, Any]:
    """A tensor as llama.cpp's converter stores it: vectors f32, matrices in `qtype` (Q8_0 where rows split
    into whole blocks, else f16)."""
    import gguf

    data = tensor.detach().to(torch.float32).cpu().numpy()
    kind = ggml_type(qtype)
    if data.ndim < 2 or qtype == "f32":
        return data, gguf.GGMLQuantizationType.F32
    if qtype == "f16" or data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] != 0:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, kind), kind


def rope_tensors(config: Any) -> list[tuple[str, np.ndarray, Any]]:
    """llama.cpp's per-frequency rotary factors: longrope's long and short ones, or Llama 3.1's `rope_freqs`."""
    import gguf

    f32 = gguf.GGMLQuantizationType.F32
    rope = layouts.rope_settings(config)
    if rope["rope_type"] == "llama3":
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", layouts.llama3_rope_factors(config), f32)]
    if not layouts.is_longrope(config):
        return []
    long, short = rope.get("long_factor"), rope.get("short_factor")
    half = layouts.rope_dimensions(config) // 2
    if not long or not short or len(long) != half or len(short) != half:
        raise UserError(f"config.json: longrope needs long_factor and short_factor of {half} values each")
    return [
        (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.asarray(long, np.float32), f32),
        (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.asarray(short, np.float32), f32),
    ]
