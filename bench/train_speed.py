"""Training speed: philora vs TRL's SFTTrainer, same model, data, LoRA, row length, batch and steps.

    .venv/bin/python bench/train_speed.py [--steps 6] [--length 512] [--batch 4] [--rounds 2] [--dtype auto]
                                          [--checkpoint-layers F]

The model is the embedded SmolLM2-135M re-laid as Phi-3, LoRA r=16 alpha=32 dropout 0.05 on all linear layers,
on generated multi-turn chats. TRL is configured like the Phi-3 model card's sample_finetune.py (packing), with
gradient checkpointing only when philora checkpoints too (its faster setting otherwise), in the same dtype.
`--dtype auto` runs fp32, and bf16 too where this CPU multiplies bf16 in hardware (AMX/AVX512-BF16); each dtype
compares philora with TRL in that dtype. Each side runs in its own process; the first step is warm-up and not
timed. Printed per side: useful (non-padding) tokens/s, peak RSS, MFU against the matmul peak measured here on
this model's shapes (batch x length tokens, hidden, intermediate; a LoRA step costs about 4 x parameters FLOP per
token: forward, and backward through the frozen weights), the first losses, and the ratio philora/TRL.
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
    p.add_argument("--rounds", type=int, default=2,
                   help="alternate philora and TRL this many times; best of each (a run varies by ~10%%)")  # fmt: skip
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "both"],
        default="auto",
        help="auto: float32, and bfloat16 too where the CPU has bf16 arithmetic",
    )
    p.add_argument("--checkpoint-layers", type=float, default=0.0, metavar="F",
                   help="philora recomputes this fraction of layers, TRL then all (0 = neither)")  # fmt: skip
    args = p.parse_args()
    if work_if_worker(args):
        return

    from data_prep import generate
    from transformers import AutoConfig

    from philora.hardware import cpu_has_fast_bf16
    from philora.model.embedded import embedded_model_dir

    model_config = AutoConfig.from_pretrained(embedded_model_dir())  # converted once, before either side is timed
    if args.dtype == "auto":
        dtypes = ["float32", "bfloat16"] if cpu_has_fast_bf16() else ["float32"]
    else:
        dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    shape = (args.batch * args.length, model_config.hidden_size, model_config.intermediate_size)
    print(cpu_line(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chats.jsonl"
        generate(data, args.rows)
        for dtype in dtypes:
            run = Run(None, str(data), args.length, args.batch, args.steps, dtype,
                      checkpoint_layers=args.checkpoint_layers)  # fmt: skip
            results: dict[str, dict] = {}
            for _ in range(args.rounds):
                for name in ("philora", "trl"):
                    r = spawn(__file__, name, run)
                    if name not in results or r["tokens_per_s"] > results[name]["tokens_per_s"]:
                        results[name] = r
            report(args, dtype, matmul_peak(dtype, shape=shape), shape, results)


def cpu_line() -> str:
    """'CPU: AMD EPYC, 2 threads, bf16 flags: avx512_bf16': what the figures below were measured on."""
    import torch

    from philora.hardware import cpu_detects_bf16, cpu_flags

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = sorted({"amx_bf16", "avx512_bf16"} & cpu_flags()) or ["none"]
    return (f"CPU: {model}, {torch.get_num_threads()} threads, bf16 flags: {' '.join(flags)} "
            f"(native bf16 detected: {cpu_detects_bf16()})")  # fmt: skip


def report(args: argparse.Namespace, dtype: str, peak: float, shape: tuple[int, int, int],
           results: dict[str, dict]) -> None:  # fmt: skip
    checkpointing = (f"philora recomputes {args.checkpoint_layers:.0%} of layers, TRL all" if args.checkpoint_layers
                     else "no gradient checkpointing on either side")  # fmt: skip
    print(f"{dtype}: {args.batch} x {args.length} packed tokens per step, {args.steps} timed steps; matmul peak here "
          f"{peak:.0f} GFLOP/s on {shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]}; best of {args.rounds} alternating "
          f"round(s); {checkpointing}")  # fmt: skip
    for name, r in results.items():
        utilisation = 100 * mfu(r["tokens_per_s"], r["params"], peak)
        print(f"  {name:8} {r['tokens_per_s']:7.1f} useful tokens/s   peak RSS {r['peak_rss_mb']:6.0f} MB   "
              f"MFU {utilisation:4.1f}%   first losses {r['losses'][:4]}")  # fmt: skip
    ratio = results["philora"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    print(f"  {dtype}: ratio philora / TRL {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    main()
