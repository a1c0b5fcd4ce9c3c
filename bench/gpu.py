"""GPU training benchmark: philora vs TRL's SFTTrainer on a random-initialised Phi-3-mini (no download).

    .venv/bin/python bench/gpu.py [--steps 8] [--length 2048] [--batch 2] [--modes lora,qlora] [--no-trl]
    .venv/bin/python bench/gpu.py --tiny --steps 2          # the same code path on a 2-layer model, CPU ok

The model has Phi-3-mini-4k-instruct's exact config (3.8B parameters, vocabulary 32064, 32 layers of 3072) with
random weights, saved once to a temp dir; its tokenizer is a word-level one with Phi-3's special tokens at their
ids and Phi-3's chat template, and the data are generated chats of random words packed into rows of --length.
Modes: `lora` = bf16 weights, LoRA r16/alpha32/dropout 0.05 on all linear layers; `qlora` = the same on a 4-bit
NF4 base (bitsandbytes). For each mode and side: useful tokens/s, peak GPU memory (peak RSS on CPU), MFU against
a bf16 matmul peak measured here, and the ratio philora/TRL. TRL is configured like sample_finetune.py (packing,
gradient checkpointing). Each side runs in its own process; the first step is warm-up and not timed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Run, common_arguments, matmul_peak, mfu, spawn, work_if_worker  # noqa: E402

# Phi-3-mini-4k-instruct's config.json, the fields that shape the compute.
PHI3_MINI = {
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
}
TINY = {**PHI3_MINI, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4}  # fmt: skip
# Phi-3's special tokens at their ids; the rest of the vocabulary is placeholder words.
SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", 32000: "<|endoftext|>", 32001: "<|assistant|>", 32006: "<|system|>",
            32007: "<|end|>", 32010: "<|user|>"}  # fmt: skip
FIRST_WORD, LAST_WORD = 3, 31999


def build_model(out: Path, config: dict, seed: int = 0) -> None:
    """A random Phi-3 with `config`, saved in bf16 with a Phi-3-like tokenizer."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Phi3ForCausalLM(Phi3Config(**config)).to(torch.bfloat16)
    model.save_pretrained(out)
    build_tokenizer(config["vocab_size"]).save_pretrained(out)


def build_tokenizer(vocab_size: int):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from philora.data.templates import PHI3_TEMPLATE

    vocab = {SPECIALS.get(i, f"w{i}" if FIRST_WORD <= i <= LAST_WORD else f"<|placeholder{i}|>"): i
             for i in range(vocab_size)}  # fmt: skip
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": [t for i, t in SPECIALS.items() if i >= 32000]})
    tokenizer.chat_template = PHI3_TEMPLATE
    return tokenizer


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """Chats of 1-3 exchanges of random words, answers of 100-600 words."""
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(f"w{rng.randint(FIRST_WORD, LAST_WORD)}" for _ in range(rng.randint(lo, hi)))

    with path.open("w") as f:
        for _ in range(rows):
            messages = [{"role": "system", "content": words(5, 30)}] if rng.random() < 0.3 else []
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": words(20, 200)},
                             {"role": "assistant", "content": words(100, 600)}]  # fmt: skip
            f.write(json.dumps({"messages": messages}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(p, steps=8, length=2048, batch=2, rows=400)
    p.add_argument("--modes", default="lora,qlora", help="comma-separated: lora, qlora")
    p.add_argument("--no-trl", action="store_true", help="philora only")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model with the same vocabulary (for a CPU check)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if work_if_worker(args):
        return

    import importlib.util

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    attn = "flash_attention_2" if device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    sides = ["philora"] if args.no_trl else ["philora", "trl"]
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = Path(tmp) / "model", Path(tmp) / "chats.jsonl"
        build_model(model_dir, TINY if args.tiny else PHI3_MINI)
        generate(data, args.rows)
        for mode in args.modes.split(","):
            quantization = {"lora": None, "qlora": "4bit"}[mode]
            run = Run(str(model_dir), str(data), args.length, args.batch, args.steps, "bfloat16", quantization, attn)
            for side in sides:
                results.append({"mode": mode, "side": side, **spawn(__file__, side, run)})
    side = 8192 if device == "cuda" else 256
    peak = matmul_peak("bfloat16", device, (side, side, side))
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    model = "tiny" if args.tiny else "Phi-3-mini"
    print(f"{name}; {model} random init; {args.batch} x {args.length} packed tokens per step, {args.steps} timed "
          f"steps, bf16, attention {attn}; bf16 matmul peak {peak:.0f} GFLOP/s")  # fmt: skip
    memory = "peak_gpu_mb" if device == "cuda" else "peak_rss_mb"
    for r in results:
        r["mfu"] = mfu(r["tokens_per_s"], r["params"], peak)
        print(f"{r['mode']:6} {r['side']:8} {r['tokens_per_s']:9.1f} useful tokens/s   {memory} {r[memory]:8.0f}   "
              f"MFU {100 * r['mfu']:5.1f}%   losses {r['losses']}")  # fmt: skip
    for mode in args.modes.split(","):
        rate = {r["side"]: r["tokens_per_s"] for r in results if r["mode"] == mode}
        if "trl" in rate:
            print(f"{mode}: ratio philora / TRL {rate['philora'] / rate['trl']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "peak_gflops": peak, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
