"""Model selection: which evaluation during training was the best, when to stop for want of progress, and whether
the trained model ended worse than the one the run started from.

Names and rules are transformers' (`metric_for_best_model`, `greater_is_better`, `load_best_model_at_end`,
`EarlyStoppingCallback`'s patience and threshold): a new best is strictly better than the best so far; early
stopping counts the evaluations in a row that did not beat the best by more than the threshold. What the loop
keeps of this is `Selection`, saved in every checkpoint with the rest of `Progress`, so a resumed run chooses
and stops as an uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from philora.config import TrainingSection
from philora.errors import UserError


def fixes(tc: TrainingSection) -> str:
    """What usually helps when a run of this method ends worse than it started, leaving out what it does already."""
    keep_best = (
        []
        if tc.load_best_model_at_end
        else ["evaluate during training (eval_strategy: steps) with load_best_model_at_end: true to keep the best step"]
    )
    own = "rejected answers from the model's own outputs (scripts/make_preference_data.py --answers)"
    types = [tc.loss_type] if isinstance(tc.loss_type, str) else tc.loss_type
    by_method = {
        "sft": ["lower training_config.learning_rate or train fewer epochs"],
        "dpo": ["lower training_config.learning_rate",
                *([] if "sft" in types else ["loss_type: [sigmoid, sft] (keeps the chosen answers likely)"]), own],
        "orpo": ["lower training_config.learning_rate or beta", own],
    }  # fmt: skip
    return "; ".join(by_method[tc.method] + keep_best)


@dataclass
class Selection:
    """The best evaluation so far and early stopping's count: part of what a checkpoint saves."""

    metric: str | None = None  # what best_value measures
    best_step: int | None = None
    best_value: float | None = None
    evaluations: int = 0
    since_improved: int = 0  # evaluations in a row that did not improve by more than the threshold
    stopped_early: bool = False


def metric_name(tc: TrainingSection, scored: bool) -> str:
    """The metric that selects, as metrics.jsonl names it: the one configured (eval_ added when left out), else
    exact match when answers are scored during training, else the eval loss."""
    if tc.metric_for_best_model:
        name = tc.metric_for_best_model
        return name if name.startswith("eval_") else f"eval_{name}"
    return "eval_exact_match" if scored else "eval_loss"


def greater_is_better(tc: TrainingSection, name: str) -> bool:
    if tc.greater_is_better is not None:
        return tc.greater_is_better
    return not name.endswith(("loss", "ppl", "perplexity"))


def require_metric(name: str, logged: Sequence[str]) -> None:
    """A selection metric the run's evaluations do not log is the user's mistake, named before training."""
    if name not in logged:
        raise UserError(
            f"training_config.metric_for_best_model: {name} is not among this run's eval metrics; use one of "
            f"{', '.join(sorted(logged))}"
        )


def record(selection: Selection, step: int, value: float, greater: bool, threshold: float) -> bool:
    """Count one evaluation; True when it is the new best."""
    best = selection.best_value
    gain = None if best is None else (value - best if greater else best - value)
    selection.evaluations += 1
    selection.since_improved = 0 if gain is None or gain > threshold else selection.since_improved + 1
    if gain is None or gain > 0:
        selection.best_step, selection.best_value = step, value
        return True
    return False


def patience_out(selection: Selection, tc: TrainingSection) -> bool:
    patience = tc.early_stopping_patience
    return patience is not None and selection.since_improved >= patience


def score_of(evaluation: dict[str, Any], side: str, name: str) -> float | None:
    """`name` (as metrics.jsonl names it) in eval.json's results for the model before or after training."""
    plain = name.removeprefix("eval_")
    if plain in ("loss", "ppl"):
        losses = evaluation.get("loss", {}).get(side, {})
        return losses.get("eval_loss" if plain == "loss" else "perplexity")
    value = evaluation.get(side, {}).get(plain)
    return float(value) if isinstance(value, (int, float)) else None


def regression(evaluation: dict[str, Any], name: str, greater: bool) -> tuple[str, float, float] | None:
    """(metric, start, end) when the trained model scores worse than the starting one on `name`, or, where that was
    not measured on both, on exact match; None when it is not worse or cannot be told."""
    for metric in dict.fromkeys((name, "eval_exact_match")):
        start, end = score_of(evaluation, "before", metric), score_of(evaluation, "after", metric)
        if start is None or end is None:
            continue
        worse = end < start if greater_is_better_for(metric, name, greater) else end > start
        return (metric, start, end) if worse else None
    return None


def greater_is_better_for(metric: str, chosen: str, greater: bool) -> bool:
    return greater if metric == chosen else not metric.endswith(("loss", "ppl"))


def shown(name: str, value: float) -> str:
    """A metric's value as people read it: a share as a percentage, a loss as a number."""
    if name.endswith(("loss", "ppl", "margins", "chosen", "rejected")):
        return f"{value:.4f}"
    return f"{100 * value:.1f}%"
