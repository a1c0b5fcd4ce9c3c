"""What a run records while it trains: metrics.jsonl, and loss.png drawn from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON lines, one per logged step or evaluation; kept in memory for plotting."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():  # a resumed run continues its own log
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            for number, line in enumerate(lines, start=1):
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    if number < len(lines):
                        raise
                    # the last line was cut by a kill mid-write; resuming rewrites the log without it

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run replays them) and rewrite the file, atomically."""
        self.records = [r for r in self.records if r["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


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
