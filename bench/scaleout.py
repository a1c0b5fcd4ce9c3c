"""Scale-out check: each shipped accelerate config (DDP, FSDP, DeepSpeed ZeRO-2/3) against one plain process.

    .venv/bin/python bench/scaleout.py [--gpus N] [--engines ddp,fsdp,deepspeed-zero2,deepspeed-zero3] [--json F]
    .venv/bin/python bench/scaleout.py --tiny --engines ddp --gpus 2     # the same code path on a CPU (gloo)

Every engine trains the same random Phi-3 (the tiny one or Phi-3-mini's exact config, as bench/gpu.py builds them)
on the same generated chats with the same global batch: N processes x 2 rows, 2 micro-batches accumulated per
step, clipping on, bf16 weights, no dropout. The reference is one plain process with N x 2 rows. Printed per
engine: the largest relative difference of the per-step losses and grad norms from the reference, the largest
difference of the adapter weights, tokens/s and peak memory. One step per `gradient_accumulation_steps`
micro-batches, clipped once, shows as losses that follow the reference from step 2 on; an engine that stepped per
micro-batch would drift from step 1. DeepSpeed and FSDP need GPUs (accelerate runs a CPU process as plain DDP).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu import PHI3_MINI, TINY, build_model, generate  # noqa: E402

ACCELERATE_CONFIGS = HERE.parent / "philora" / "configs" / "accelerate"
ENGINES = ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")


def write_config(path: Path, model: Path, data: Path, steps: int, length: int, batch: int) -> Path:
    path.write_text(
        f"""model: {{name_or_path: {model}, dtype: bfloat16}}
data: {{train: {data}, max_length: {length}}}
peft_config: {{r: 16, lora_alpha: 32, lora_dropout: 0.0, target_modules: all-linear}}
training_config: {{max_steps: {steps}, per_device_train_batch_size: {batch}, gradient_accumulation_steps: 2,
                   learning_rate: 1.0e-3, max_grad_norm: 1.0, logging_steps: 1, save_steps: 100000, seed: 0}}
"""
    )
    return path


def train(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")


def outcome(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    run = json.loads((run_dir / "run.json").read_text())
    return {
        "losses": [r["loss"] for r in records if "loss" in r],
        "grad_norms": [r["grad_norm"] for r in records if "loss" in r],
        "adapter": load_file(run_dir / "adapter" / "adapter_model.safetensors"),
        "tokens_per_s": run["tokens_per_s"],
        "peak_memory_mb": run.get("peak_memory_mb"),
    }


def largest_relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def compare(engine: dict, reference: dict) -> dict:
    adapter = max(float((engine["adapter"][k].float() - reference["adapter"][k].float()).abs().max())
                  for k in reference["adapter"])  # fmt: skip
    return {
        "loss_rel": largest_relative(engine["losses"], reference["losses"]),
        "grad_norm_rel": largest_relative(engine["grad_norms"], reference["grad_norms"]),
        "adapter_max_abs": adapter,
        "tokens_per_s": engine["tokens_per_s"],
        "peak_memory_mb": engine["peak_memory_mb"],
        "losses": engine["losses"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=None, help="processes per engine (default: the visible GPUs)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {', '.join(ENGINES)}")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model with Phi-3-mini's vocabulary")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    import torch

    gpus = args.gpus or torch.cuda.device_count() or 2
    engines = args.engines.split(",")
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise SystemExit(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = "1"  # N CPU processes share the cores
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_model(root / "model", TINY if args.tiny else PHI3_MINI)
        generate(root / "chats.jsonl", args.rows)
        config = write_config(root / "run.yaml", root / "model", root / "chats.jsonl", args.steps, args.length, 2)
        philora = [str(bin_dir / "philora"), "train", "--config", str(config)]
        train([*philora, "--output", "reference", "--set", f"training_config.per_device_train_batch_size={2 * gpus}"],
              root, env)  # fmt: skip
        reference = outcome(root / "reference")
        for engine in engines:
            engine_config = str(ACCELERATE_CONFIGS / f"{engine}.yaml")
            launch = [str(bin_dir / "accelerate"), "launch", "--config_file", engine_config, "--num_processes",
                      str(gpus), "-m", "philora", "train", "--config", str(config)]  # fmt: skip
            if not torch.cuda.is_available():  # accelerate's multi-CPU mode: gloo
                launch[2:4] = ["--multi_gpu"]
            train([*launch, "--output", engine], root, env)
            results[engine] = compare(outcome(root / engine), reference)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    model = "tiny" if args.tiny else "Phi-3-mini"
    print(f"{name} x {gpus}; {model} random init, bf16, {gpus} x 2 rows of {args.length}, 2 micro-batches per step, "
          f"{args.steps} steps; reference: 1 process, {2 * gpus} rows")  # fmt: skip
    print(f"reference losses {reference['losses']}, {reference['tokens_per_s']:.0f} tokens/s")
    for engine, r in results.items():
        print(f"{engine:16} loss rel {r['loss_rel']:.2e}  grad norm rel {r['grad_norm_rel']:.2e}  "
              f"adapter max |Δ| {r['adapter_max_abs']:.2e}  {r['tokens_per_s']:8.0f} tokens/s  "
              f"peak {r['peak_memory_mb']} MB")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"device": name, "processes": gpus, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
