"""What `philora sweep` costs beside its trials: a real sweep of the embedded demo (short trials, eval loss on 8
conversations, no generated answers: they cost minutes and do not change what the sweep itself costs), then per
trial its wall time as the sweep measured it, train's own wall_seconds from its run.json (data, model, training,
evaluation), the difference (a new process: Python, torch and transformers imported, the config read) and their
ratio; and the sweep's own time outside its trials (its imports, Optuna, the results rewritten after each trial).

    .venv/bin/python bench/sweep.py [--trials 2] [--steps 10] [--keep DIR]

Do not time it while other heavy work runs on the same cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="training_config.max_steps of each trial")
    p.add_argument("--keep", metavar="DIR", help="sweep into DIR and keep it (default: a temporary dir)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="philora-bench-sweep-") as scratch:
        out = Path(args.keep or Path(scratch) / "sweep")
        command = [sys.executable, "-m", "philora", "sweep", "--output", str(out), "--trials", str(args.trials),
                   "--set", f"training_config.max_steps={args.steps}", "--set", "data.max_eval_samples=8",
                   "--set", "training_config.save_strategy=no", "--set", "training_config.predict_with_generate=false",
                   "--set-range", "training_config.learning_rate=5e-4:5e-3:log"]  # fmt: skip
        print("$ " + " ".join(command[2:]), flush=True)
        started = time.monotonic()
        done = subprocess.run(command)
        total = time.monotonic() - started
        if done.returncode != 0:
            return done.returncode
        report(out, total)
    return 0


def report(out: Path, total: float) -> None:
    import optuna

    from philora.sweep import study

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not its line about loading the study
    trials = study.open_study(out, 0, 2).get_trials()
    print(f"\n{'trial':<10} {'wall s':>8} {'train s':>8} {'overhead s':>11} {'wall/train':>10}")
    for t in trials:
        wall = t.user_attrs.get("wall_seconds")
        record = out / f"trial-{t.number:03d}" / "run.json"
        train = json.loads(record.read_text())["wall_seconds"] if record.is_file() else None
        if wall is None or train is None:
            print(f"trial-{t.number:03d} {t.state.name.lower()}: no timing")
            continue
        print(f"trial-{t.number:03d} {wall:>8.1f} {train:>8.1f} {wall - train:>11.1f} {wall / train:>10.2f}")
    trial_time = sum(t.user_attrs.get("wall_seconds") or 0 for t in trials)
    print(f"\nsweep {total:.1f}s in all: {trial_time:.1f}s in its trials, {total - trial_time:.1f}s its own "
          f"({(total - trial_time) / max(len(trials), 1):.1f}s a trial)")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
