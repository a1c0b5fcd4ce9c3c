"""Data preparation speed: philora vs TRL's SFTTrainer on the same generated chat file.

    .venv/bin/python bench/data_prep.py [--rows 20000] [--max-length 2048]

Both sides start from the same .jsonl file and the same tokenizer (the embedded SmolLM2 one) and end with
token ids, loss masks and packed rows of max_length:
- philora: read, validate, render turn by turn with token-exact prefix checks, fit to max_length, pack
  (`data.prepare` + `batching.pack`), cold (no cache) and warm (the second run, from the cache);
- TRL 1.x: `load_dataset("json")` + `SFTTrainer._prepare_dataset` with packing on (BFD), as the Phi-3 model
  card's sample_finetune.py configures it, with TRL's default single process and with as many processes as
  philora uses.
Prints conversations/s for each and the ratios. No network, nothing written outside a temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

TEXT = (
    "the model answers questions about data files tokens training loss rate batch step memory speed review "
    "report table chart customer order invoice shipment delivery address contact meeting schedule project "
    "budget forecast quarter revenue cost margin risk plan team owner deadline status update summary detail "
    "please could you explain why how what when which where list steps example short long simple clear"
)
WORDS = TEXT.split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """Chats of 1-4 exchanges, a third with a system prompt, answers of 20-300 words."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    with path.open("w") as f:
        for _ in range(rows):
            messages = [{"role": "system", "content": text(5, 30)}] if rng.random() < 0.33 else []
            for _ in range(rng.randint(1, 4)):
                messages += [{"role": "user", "content": text(5, 120)}, {"role": "assistant", "content": text(20, 300)}]
            f.write(json.dumps({"messages": messages}) + "\n")


def time_philora(path: Path, tokenizer: object, max_length: int, cache: bool) -> tuple[float, int, int]:
    from philora.config import DataSection
    from philora.data import prepare
    from philora.data.batching import pack

    start = time.perf_counter()
    dc = DataSection(train=str(path), max_length=max_length, overlong="drop", cache=cache)
    prepared = prepare(dc, tokenizer, seed=0)
    rows = pack([len(s.input_ids) for s in prepared.train.samples], max_length)
    return time.perf_counter() - start, len(prepared.train.samples), len(rows)


def time_trl(path: Path, model_dir: Path, max_length: int, num_proc: int | None) -> tuple[float, int]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            max_length=max_length,
            packing=True,
            dataset_num_proc=num_proc,
            report_to="none",
            use_cpu=True,
        )
        tiny = datasets.Dataset.from_list([json.loads(line) for line in path.open().readlines()[:4]])
        trainer = SFTTrainer(model=model, args=args, train_dataset=tiny, processing_class=tokenizer)
        start = time.perf_counter()
        dataset = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=tmp)
        n = len(dataset)
        trainer._prepare_dataset(dataset, tokenizer, args, True, None, "train")
        return time.perf_counter() - start, n


def tiny_model(tokenizer_dir: Path, out: Path) -> Path:
    """A 1-layer model with the embedded tokenizer, so that TRL's trainer can be built quickly."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    Phi3ForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--max-length", type=int, default=2048)
    args = p.parse_args()

    from philora.config import ModelSection
    from philora.data.encode import worker_count
    from philora.model.embedded import embedded_model_dir
    from philora.model.load import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        embedded = embedded_model_dir()
        os.environ["PHILORA_CACHE_DIR"] = str(root / "cache")  # a cold data cache, then a warm one
        path = root / "chats.jsonl"
        generate(path, args.rows)
        tokenizer = load_tokenizer(ModelSection(name_or_path=str(embedded)))
        procs = worker_count(None, args.rows)
        print(f"{args.rows:,} conversations, {path.stat().st_size / 1e6:.1f} MB, max_length {args.max_length}")

        cold, samples, rows = time_philora(path, tokenizer, args.max_length, cache=True)
        warm, _, _ = time_philora(path, tokenizer, args.max_length, cache=True)
        model_dir = tiny_model(embedded, root / "tiny")
        trl_one, n = time_trl(path, model_dir, args.max_length, None)
        trl_many, _ = time_trl(path, model_dir, args.max_length, procs) if procs > 1 else (trl_one, n)

        def rate(seconds: float) -> str:
            return f"{args.rows / seconds:8,.0f} conversations/s ({seconds:6.2f} s)"

        print(f"philora cold ({procs} processes): {rate(cold)}  → {samples:,} samples in {rows:,} packed rows")
        print(f"philora warm (cache):            {rate(warm)}")
        print(f"TRL SFTTrainer (1 process):      {rate(trl_one)}")
        print(f"TRL SFTTrainer ({procs} processes):     {rate(trl_many)}")
        best = min(trl_one, trl_many)
        print(f"ratio philora cold / best TRL: {best / cold:.2f}x   warm / best TRL: {best / warm:.1f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
