"""`philora check`'s memory estimate against the peak a real training step reaches, shape by shape.

Each shape runs twice, each in a process of its own: `philora check --json` (the estimate) and `philora train` for
two steps (run.json's peak: resident set size on a CPU, the allocator's peak on a GPU). Prints one row per shape
with the ratio; the tests hold the ratio within 20%.

    python bench/memory_estimate.py                 # the embedded model, the shapes below
    python bench/memory_estimate.py --config FILE   # another model; --shape "max_length,batch,checkpointing" ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = ["384,1,false", "1024,2,false", "1024,2,true", "2048,2,true"]


def overrides(shape: str) -> list[str]:
    length, batch, checkpointing = shape.split(",")
    return [f"data.max_length={length}", f"training_config.per_device_train_batch_size={batch}",
            f"training_config.gradient_checkpointing={checkpointing}"]  # fmt: skip


def _sets(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def estimated(config: str, settings: list[str]) -> dict:
    """`philora check --json`'s memory section (bytes)."""
    command = [sys.executable, "-m", "philora", "check", "--config", config, "--json", *_sets(settings)]
    done = subprocess.run(command, capture_output=True, text=True)
    if not done.stdout:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout)["memory"]


def measured(config: str, settings: list[str], out: Path) -> float:
    """Peak memory of a real 2-step run (bytes), no evaluation, no checkpoints."""
    quiet = ["training_config.max_steps=2", "training_config.predict_with_generate=false",
             "training_config.do_eval=false", "training_config.eval_strategy=no",
             "training_config.save_strategy=no"]  # fmt: skip
    command = [sys.executable, "-m", "philora", "train", "--config", config, "--output", str(out),
               *_sets(quiet + settings)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads((out / "run.json").read_text())["peak_memory_mb"] * 1024**2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo", help="config file or preset (default: the embedded demo)")
    p.add_argument("--shape", action="append", help="max_length,micro-batch,checkpointing (repeatable)")
    p.add_argument("--set", dest="settings", action="append", default=[], help="another override for every shape")
    args = p.parse_args()
    print(f"{'max_length x batch':>18} {'ckpt':>5} {'estimate':>10} {'measured':>10} {'ratio':>6}")
    for shape in args.shape or SHAPES:
        settings = overrides(shape) + args.settings
        with tempfile.TemporaryDirectory() as scratch:
            estimate = estimated(args.config, settings)["total"]
            peak = measured(args.config, settings, Path(scratch) / "run")
        length, batch, checkpointing = shape.split(",")
        print(f"{length + ' x ' + batch:>18} {checkpointing:>5} {estimate / 2**20:>8.0f}MB {peak / 2**20:>8.0f}MB "
              f"{estimate / peak:>6.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
