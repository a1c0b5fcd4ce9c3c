"""Training speed: philora vs TRL's SFTTrainer, same model, data, LoRA, row length, batch and steps.

    .venv/bin/python bench/train_speed.py [--steps 6] [--length 512] [--batch 4] [--rounds 1] [--bf16]

The model is the embedded SmolLM2-135M re-laid as Phi-3, LoRA r=16 alpha=32 dropout 0.05 on all linear layers,
on generated multi-turn chats. TRL is configured like the Phi-3 model card's sample_finetune.py (packing,
gradient checkpointing; bf16 only with --bf16, since this CPU has no bf16 arithmetic and emulates it). Each side
runs in its own process; the first step is warm-up and not timed. Printed per side: useful (non-padding)
tokens/s, peak RSS, MFU against a matmul peak measured here (a LoRA step costs about 4 x parameters FLOP per
token: forward, and backward through the frozen weights), the loss of each step, and the ratio philora/TRL.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Run, common_arguments, matmul_peak, mfu, spawn, work_if_worker  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(p, steps=6, length=512, batch=4, rows=600)
    p.add_argument("--rounds", type=int, default=1, help="alternate philora and TRL this many times; best of each")
    p.add_argument("--bf16", action="store_true", help="bf16 weights/autocast on both sides")
    p.add_argument("--checkpoint-layers", type=float, default=0.0, metavar="F",
                   help="philora recomputes this fraction of layers (0 = none; TRL recomputes all)")  # fmt: skip
    args = p.parse_args()
    if work_if_worker(args):
        return

    from data_prep import generate

    from philora.model.embedded import embedded_model_dir

    embedded_model_dir()  # converted once, before either side is timed
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chats.jsonl"
        generate(data, args.rows)
        dtype = "bfloat16" if args.bf16 else "float32"
        run = Run(None, str(data), args.length, args.batch, args.steps, dtype, checkpoint_layers=args.checkpoint_layers)
        for _ in range(args.rounds):
            for name in ("philora", "trl"):
                r = spawn(__file__, name, run)
                if name not in results or r["tokens_per_s"] > results[name]["tokens_per_s"]:
                    results[name] = r
    peak = matmul_peak(dtype)
    print(f"{args.batch} x {args.length} packed tokens per step, {args.steps} timed steps, {dtype}; "
          f"matmul peak here {peak:.0f} GFLOP/s; best of {args.rounds} alternating round(s); philora recomputes "
          f"{args.checkpoint_layers:.0%} of layers, TRL all")  # fmt: skip
    for name, r in results.items():
        print(f"{name:8} {r['tokens_per_s']:7.1f} useful tokens/s   peak RSS {r['peak_rss_mb']:6.0f} MB   "
              f"MFU {100 * mfu(r['tokens_per_s'], r['params'], peak):4.1f}%   losses {r['losses']}")  # fmt: skip
    print(f"ratio philora / TRL: {results['philora']['tokens_per_s'] / results['trl']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
