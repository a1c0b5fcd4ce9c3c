"""Training speed: philora vs TRL's SFTTrainer, same model, data, LoRA, row length, batch and steps.

    .venv/bin/python bench/train_speed.py [--steps 6] [--length 512] [--batch 4] [--rows 600] [--bf16]

The model is the embedded SmolLM2-135M re-laid as Phi-3, LoRA r=16 alpha=32 dropout 0.05 on all linear layers,
on generated multi-turn chats. TRL is configured like the Phi-3 model card's sample_finetune.py (packing,
gradient checkpointing; bf16 only with --bf16, since this CPU has no bf16 arithmetic and emulates it). Each side
runs in its own process; the first step is warm-up and not timed. Printed per side: useful (non-padding)
tokens/s, peak RSS, MFU against a matmul peak measured here (a LoRA step costs about 4 x parameters FLOP per
token: forward, and backward through the frozen weights), the loss of each step, and the ratio philora/TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
LEARNING_RATE = 2e-4


def matmul_peak(dtype_name: str, size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a square matmul in this dtype on this machine."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def rate(marks: list[tuple[float, int]]) -> float:
    """Tokens/s between the end of the first (warm-up) step and the last."""
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0)


def run_philora(args: argparse.Namespace, out: Path) -> dict:
    from philora.config import load_config
    from philora.train import train

    settings = {
        "model.dtype": "bfloat16" if args.bf16 else "float32",
        "data.train": str(args.data),
        "data.max_length": args.length,
        "data.packing": True,
        "data.cache": False,
        "peft_config.r": LORA["r"],
        "peft_config.lora_alpha": LORA["lora_alpha"],
        "peft_config.lora_dropout": LORA["lora_dropout"],
        "training_config.output_dir": str(out),
        "training_config.max_steps": args.steps + 1,
        "training_config.per_device_train_batch_size": args.batch,
        "training_config.learning_rate": LEARNING_RATE,
        "training_config.lr_scheduler_type": "constant",
        "training_config.warmup_ratio": 0,
        "training_config.logging_steps": 1,
        "training_config.save_steps": 10_000,
        "training_config.predict_with_generate": False,
        "training_config.seed": 0,
    }
    train(load_config(None, [f"{k}={v}" for k, v in settings.items()]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {
        "marks": [(r["elapsed_s"], r["tokens"]) for r in steps],
        "losses": [round(r["loss"], 4) for r in steps],
        "params": json.loads((out / "run.json").read_text())["parameters"]["total"],
    }


def run_trl(args: argparse.Namespace, out: Path) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from philora.embedded import embedded_model_dir

    datasets.disable_progress_bars()
    model_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = "<|endoftext|>"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    marks: list[tuple[float, int]] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, _control, **_kwargs):
            marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

        def on_log(self, _args, _state, _control, logs=None, **_kwargs):
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 4))

    config = SFTConfig(
        output_dir=str(out),
        max_length=args.length,
        packing=True,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + 1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        bf16=args.bf16,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        include_num_input_tokens_seen="non_padding",
    )
    dataset = datasets.load_dataset("json", data_files=str(args.data), split="train", cache_dir=str(out / "hf"))
    peft_config = LoraConfig(**LORA, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
        callbacks=[Clock()],
    )  # fmt: skip
    trainer.train()
    return {"marks": marks, "losses": losses, "params": sum(p.numel() for p in model.parameters())}


def worker(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = (run_philora if args.worker == "philora" else run_trl)(args, Path(tmp))
    result["tokens_per_s"] = rate(result.pop("marks"))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps (one more runs first, untimed)")
    p.add_argument("--length", type=int, default=512, help="packed row length")
    p.add_argument("--batch", type=int, default=4, help="rows per step")
    p.add_argument("--rows", type=int, default=600, help="generated conversations")
    p.add_argument("--bf16", action="store_true", help="bf16 weights/autocast on both sides")
    p.add_argument("--worker", choices=["philora", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(HERE))
    from data_prep import generate

    from philora.embedded import embedded_model_dir

    embedded_model_dir()  # converted once, before either side is timed
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chats.jsonl"
        generate(data, args.rows)
        for name in ("philora", "trl"):
            command = [sys.executable, __file__, "--worker", name, "--data", str(data)]
            command += ["--steps", str(args.steps), "--length", str(args.length), "--batch", str(args.batch)]
            command += ["--bf16"] if args.bf16 else []
            run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{name} failed:\n{run.stderr[-3000:]}")
            results[name] = json.loads(line.removeprefix("RESULT "))
    peak = matmul_peak("bfloat16" if args.bf16 else "float32")
    print(f"{args.batch} x {args.length} packed tokens per step, {args.steps} timed steps, "
          f"{'bf16' if args.bf16 else 'fp32'}; matmul peak here {peak:.0f} GFLOP/s")  # fmt: skip
    for name, r in results.items():
        mfu = r["tokens_per_s"] * 4 * r["params"] / (peak * 1e9)
        print(f"{name:8} {r['tokens_per_s']:7.1f} useful tokens/s   peak RSS {r['peak_rss_mb']:6.0f} MB   "
              f"MFU {100 * mfu:4.1f}%   losses {r['losses']}")  # fmt: skip
    print(f"ratio philora / TRL: {results['philora']['tokens_per_s'] / results['trl']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
