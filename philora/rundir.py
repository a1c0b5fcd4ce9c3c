"""A run directory: the names of the files `philora train` writes, in one place, and how its records are read
back (metrics.jsonl, drawn as loss.png) by the run itself, by a resumed run and by `philora eval`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunDir:
    """The files of one run under `root` (training_config.output_dir)."""

    root: Path

    @property
    def adapter(self) -> Path:  # the trained adapter, PEFT format, with the tokenizer
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:  # checkpoints/step-N/
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:  # one JSON line per logged step or evaluation
        return self.root / "metrics.jsonl"

    @property
    def record(self) -> Path:  # run.json: config, versions, data, dtype, results
        return self.root / "run.json"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def lora_init(self) -> Path:  # PiSSA/OLoRA: the adapter as initialised, to convert the trained one
        return self.root / "lora-init"

    @property
    def base_answers(self) -> Path:  # the base model's answers to the eval prompts, before training
        return self.root / "base-answers.json"

    def reference(self, split: str) -> Path:  # dpo: the reference log-probabilities of the train or eval pairs
        return self.root / f"reference-{split}.npy"

    @property
    def tensorboard(self) -> Path:
        return self.root / "runs"

    @property
    def eval_output(self) -> Path:  # where `philora eval` writes for this run
        return self.root / "eval"

    def written(self) -> list[Path]:
        """Every file or folder of a run that exists here (a new run into this dir would mix with them)."""
        names = [self.adapter, self.checkpoints, self.metrics, self.record, self.loss_plot,
                 *(self.root / f for f in EVAL_FILES), self.eval_output, self.lora_init, self.tensorboard,
                 self.base_answers, self.reference("train"), self.reference("eval")]  # fmt: skip
        return [p for p in names if p.exists()]


# What an evaluation writes (beside the run's other files, or into RUN/eval).
EVAL_FILES = ("eval.json", "eval.md", "report.html")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A last line cut by a kill mid-write is left out (a resumed run rewrites the
    log without it); a bad line anywhere else is an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
    return records


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss per step and eval loss per evaluation, written to `path` as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set here, not at import, to leave other users alone
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#2f6db5")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="#d9822b")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per trained token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
