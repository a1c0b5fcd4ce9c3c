"""A model of a real Phi shape with random weights, ready for `model.name_or_path`: time and memory at full size
without downloading anything (neither depends on the weights' values).

    python scripts/make_real_shape.py phi3-mini-4k out/shapes/phi3-mini-4k     # 3.93B, bf16 (7.9 GB on disk)
    python scripts/make_real_shape.py phi4-mini out/shapes/phi4-mini           # 3.84B, 200k vocabulary, tied head
    python scripts/make_real_shape.py 1b out/shapes/1b                         # a 1.0B Phi-3, for the slow test

Shapes are those of the published configs (hidden size, layers, heads and key-value heads, MLP width, vocabulary,
tied head, partial rotary, longrope). Two things differ, and neither changes time or memory by more than the
vocabulary rows noted: the tokenizer is the embedded model's (49,152 tokens, its ChatML template), so a vocabulary
smaller than that is raised to it (Phi-3-mini's 32,064 becomes 49,152: 3.93B parameters instead of 3.82B); and
Phi-4-mini's longrope factors are placeholders (1.0 short, a ramp long) of the real length, since runs here stay
under its original 4k context where the short factors apply.

Weights are drawn tensor by tensor (normal, std 0.02; norms 1) and written a shard at a time, so making a 3.8B model
holds one shard in memory, not the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "phi3-mini-4k": {
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096, "sliding_window": 2047, "tie_word_embeddings": False,
    },
    "phi4-mini": {
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24,
        "num_key_value_heads": 8, "vocab_size": 200064, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75, "tie_word_embeddings": True,
        "sliding_window": 262144, "longrope": True,
    },
    # a 1B-class Phi-3 (TinyLlama's widths): big enough that the memory estimate's parts are those of 3.8B
    "1b": {
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
        "num_key_value_heads": 16, "vocab_size": 32064, "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
}  # fmt: skip
SHARD_BYTES = 2 * 10**9
STD = 0.02


def phi3_config(shape: dict[str, Any], tokenizer_size: int) -> Any:
    from transformers import Phi3Config

    settings = {k: v for k, v in shape.items() if k != "longrope"}
    settings["vocab_size"] = max(settings["vocab_size"], tokenizer_size)
    if shape.get("longrope"):
        half = int(settings["hidden_size"] // settings["num_attention_heads"] * shape["partial_rotary_factor"]) // 2
        settings["rope_scaling"] = {
            "type": "longrope",
            "short_factor": [1.0] * half,
            "long_factor": [1.0 + i / half for i in range(half)],
        }
    return Phi3Config(**settings, rope_theta=10000.0, rms_norm_eps=1e-5, initializer_range=STD, dtype="bfloat16",
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip


def make(shape: str | dict[str, Any], output: Path, seed: int = 0) -> int:
    """Write the model (config, sharded bf16 safetensors, tokenizer) to `output`; returns its parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import Phi3ForCausalLM

    from philora.model import embedded

    spec = SHAPES[shape] if isinstance(shape, str) else shape
    tokenizer = embedded.gguf_tokenizer()
    config = phi3_config(spec, len(tokenizer))
    with torch.device("meta"):
        names = {n: (p.shape, n.endswith("norm.weight")) for n, p in Phi3ForCausalLM(config).named_parameters()}
    output.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    number, held = 1, 0
    weight_map: dict[str, int] = {}
    for name, (shape_, is_norm) in names.items():
        if is_norm:
            tensor = torch.ones(shape_, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(shape_, dtype=torch.float32).normal_(0, STD, generator=generator).bfloat16()
        if held and held + tensor.nbytes > SHARD_BYTES:
            _write(shard, output, number, save_file)
            number, held = number + 1, 0
        shard[name] = tensor
        weight_map[name] = number
        held += tensor.nbytes
    _write(shard, output, number, save_file)
    count = number
    files = {i: f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
    for i in range(1, count + 1):
        (output / f"model-{i:05d}.safetensors").rename(output / files[i])
    total = sum(_numel(s) * 2 for s, _ in names.values())
    index = {"metadata": {"total_size": total}, "weight_map": {n: files[i] for n, i in weight_map.items()}}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return sum(_numel(s) for s, _ in names.values())


def _write(shard: dict[str, Any], output: Path, number: int, save_file: Any) -> None:
    save_file(shard, str(output / f"model-{number:05d}.safetensors"), metadata={"format": "pt"})
    shard.clear()


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("output", type=Path, help="a new directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.output.exists() and any(args.output.iterdir()):
        sys.exit(f"make_real_shape: {args.output}: already holds files; give a new directory")
    parameters = make(args.shape, args.output, args.seed)
    print(f"{args.shape}: {parameters / 1e9:.2f}B parameters in {args.output}")


if __name__ == "__main__":
    main()
