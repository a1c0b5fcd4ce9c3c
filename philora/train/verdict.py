"""How a run ends: the adapter it writes (the last step's, or the best evaluation's with load_best_model_at_end)
and whether the trained model scores worse than the one it started from."""

from __future__ import annotations

from typing import Any

from philora.train import selection
from philora.train.state import Run


class Regressed(Exception):
    """The trained model scores worse than the starting one and the run was told to fail on that (exit 1)."""


def choose_adapter(run: Run) -> dict[str, Any] | None:
    """The best evaluation's weights put back when the run loads the best at the end (said in one line); what
    run.json records of the selection, None for a run that did not evaluate during training."""
    chosen, tc, last = run.progress.selection, run.tc, run.progress.step
    if run.metric is None or chosen.best_step is None or chosen.best_value is None:
        return None
    values = [(r["step"], r[run.metric]) for r in run.log.records if run.metric in r]
    last_step, last_value = values[-1]
    adapter_step, adapter_value = last_step, last_value
    if tc.load_best_model_at_end and chosen.best_step != last and run.best_weights is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(run.model, run.best_weights)
        run.final_pair_eval = None  # measured on the last step's weights
        adapter_step, adapter_value = chosen.best_step, chosen.best_value
        run.say(f"adapter: step {chosen.best_step}'s weights, the best {run.metric} "
                f"({selection.shown(run.metric, chosen.best_value)}; "
                f"{selection.shown(run.metric, last_value)} at step {last_step}, the last evaluation)",
                result=True)  # fmt: skip
    return {"metric": run.metric, "greater_is_better": selection.greater_is_better(tc, run.metric),
            "best_step": chosen.best_step, "best_value": chosen.best_value, "adapter_step": adapter_step,
            "adapter_value": adapter_value, "last_step": last_step, "last_value": last_value,
            "evaluations": chosen.evaluations, "load_best_model_at_end": tc.load_best_model_at_end,
            "stopped_early": chosen.stopped_early, "early_stopping_patience": tc.early_stopping_patience}  # fmt: skip


def regression(run: Run, evaluation: dict[str, Any] | None) -> str | None:
    """What says that the trained model scores worse than the one the run started from; None when it does not
    (or it cannot be told)."""
    if evaluation is None:
        return None
    tc = run.tc
    name = run.metric or selection.metric_name(tc, run.generates)
    found = selection.regression(evaluation, name, selection.greater_is_better(tc, name))
    if found is None:
        return None
    metric, start, end = found
    start_model = "the adapter it started from" if run.config.model.adapter else "the base model"
    return (f"the trained model scores worse than {start_model}: {metric} {selection.shown(metric, start)} -> "
            f"{selection.shown(metric, end)} on the held-out data")  # fmt: skip
