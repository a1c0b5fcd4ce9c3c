"""What a trial scored: which metric the sweep compares trials by, which way is better, and a trial's value, read
from the files its run wrote (run.json's "selection", else metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from philora.rundir import RunDir, read_records

LOWER_IS_BETTER = ("loss", "ppl")  # name endings: eval_loss, eval_ppl


def greater_is_better(metric: str) -> bool:
    """The direction a metric's name says: losses and perplexities go down, scores (exact match, ROUGE) go up."""
    return not metric.endswith(LOWER_IS_BETTER)


def choose(run: dict[str, Any] | None, records: list[dict[str, Any]]) -> str:
    """The metric of a sweep given no --metric, from its first trial that wrote anything: the one its run selects
    the adapter by (run.json's selection.metric), else exact match where the run logged it, else the eval loss."""
    selection = (run or {}).get("selection")
    if isinstance(selection, dict) and isinstance(selection.get("metric"), str):
        return selection["metric"]
    return "eval_exact_match" if any("eval_exact_match" in r for r in records) else "eval_loss"


def final_value(metric: str, run: dict[str, Any] | None, records: list[dict[str, Any]]) -> float | None:
    """A finished trial's value: that of the adapter it kept when its run selected by this metric (run.json's
    selection.adapter_value), else the last value it logged; None when the run logged none."""
    selection = (run or {}).get("selection")
    if isinstance(selection, dict) and selection.get("metric") == metric and _number(selection.get("adapter_value")):
        return float(selection["adapter_value"])
    return last_logged(metric, records)


def last_logged(metric: str, records: list[dict[str, Any]]) -> float | None:
    """The metric's last value in metrics.jsonl after training began (a step-0 record is the starting model's)."""
    logged = [r[metric] for r in records if _number(r.get(metric)) and r.get("step") != 0]
    return float(logged[-1]) if logged else None


def read_run(root: Path) -> dict[str, Any] | None:
    """A trial's run.json, None until its run has written it whole."""
    try:
        record = json.loads(RunDir(root).record.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_metrics(root: Path) -> list[dict[str, Any]]:
    """A trial's metrics.jsonl records (none yet: [])."""
    try:
        return read_records(RunDir(root).metrics)
    except (OSError, ValueError):
        return []


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
