"""What a run records while it trains: metrics.jsonl, and the same numbers sent to TensorBoard, Weights & Biases
or MLflow when `training_config.report_to` names them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from philora.rundir import read_records


class MetricsLog:
    """Append-only JSON lines, one per logged step or evaluation; kept in memory for plotting. With no path
    (the other processes of a data-parallel run) the records are only kept in memory."""

    def __init__(self, path: Path | None, sinks: list[Any] | None = None) -> None:
        self.path = path
        self.sinks = sinks or []
        self.records: list[dict[str, Any]] = []
        if path is not None and path.exists():  # a resumed run continues its own log
            self.records = read_records(path)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run replays them) and rewrite the file, atomically."""
        self.records = [r for r in self.records if r["step"] <= step]
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for sink in self.sinks:
            sink.log(values, record["step"])

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class TensorBoard:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(_tag(name), value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, name: str | None, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project="philora", name=name, config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({_tag(k): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, name: str | None, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=name)
        mlflow.log_params({f"{s}.{k}": v for s, values in config.items() for k, v in values.items()})

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({_tag(k).replace("/", "_"): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _tag(name: str) -> str:
    """loss -> train/loss, eval_loss -> eval/loss: the usual grouping in dashboards."""
    return f"eval/{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train/{name}"


def reporter_kinds(report_to: str | list[str]) -> list[str]:
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return list(dict.fromkeys(n for n in names if n != "none"))


def require_reporters(report_to: str | list[str]) -> None:
    """A UserError naming what to install when a package `report_to` needs is missing: checked before anything slow,
    while the sinks themselves start once the run's settings are resolved (`reporters`)."""
    import importlib.util

    for kind in reporter_kinds(report_to):
        if importlib.util.find_spec(kind) is None:  # the package of each kind has the kind's name
            _missing(kind)


def reporters(report_to: str | list[str], log_dir: Path, name: str | None, config: dict[str, Any]) -> list[Any]:
    """The sinks `report_to` names, given the run's `config` (with the values auto resolved); a missing package is
    a UserError that says what to install."""
    sinks: list[Any] = []
    for kind in reporter_kinds(report_to):
        try:
            if kind == "tensorboard":
                sinks.append(TensorBoard(log_dir))
            elif kind == "wandb":
                sinks.append(WandB(name, config))
            else:
                sinks.append(MLflow(name, config))
        except ImportError:
            _missing(kind)
    return sinks


def _missing(kind: str) -> None:
    from philora.errors import UserError

    raise UserError(f"training_config.report_to: {kind} needs its package; pip install {kind}") from None
