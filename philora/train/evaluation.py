"""Evaluation during training: what the loop measures at each evaluation (the held-out loss, or a preference
loss and its statistics; with answers scored, the first `eval_generate_samples` held-out prompts answered and
scored as `philora eval` scores them), under the eval_ names metrics.jsonl, loss.png and model selection use."""

from __future__ import annotations

import math
from typing import Any

from philora.eval import runner
from philora.eval.metrics import compare
from philora.model.preference import STATS
from philora.train.selection import shown
from philora.train.state import Run


def scores_answers(run: Run) -> bool:
    """Whether each evaluation during training also answers held-out prompts (every process agrees)."""
    return bool(run.tc.predict_with_generate and run.prompts and run.tc.eval_strategy != "no")


def prompts_scored(run: Run) -> list[Any]:
    return run.prompts[: run.tc.eval_generate_samples or None]


def logged_metrics(run: Run) -> list[str]:
    """The names each evaluation of this run logs, known before training (answers' scores are those of the
    references scored against themselves: which apply depends only on the references and the tools offered)."""
    names = ["eval_loss", *(f"eval_{s}" for s in STATS)] if run.tc.method != "sft" else ["eval_loss", "eval_ppl"]
    if scores_answers(run):
        prompts = prompts_scored(run)
        scores = compare(prompts, {"x": [r for _, r, _ in prompts]}, run.prepared.encoder.tool_syntax)["x"]
        names += [f"eval_{name}" for name in scores]
    return names


def answer_scores(answers: list[str], prompts: list[Any], run: Run) -> dict[str, float]:
    scored = compare(prompts, {"x": answers}, run.prepared.encoder.tool_syntax)["x"]
    return {f"eval_{name}": float(value) for name, value in scored.items()}


def measure(run: Run, step: int, last: bool) -> dict[str, float]:
    """Every eval metric of the model at `step`, the same on every process (the main one answers the prompts);
    after the `last` step, the preference metrics are kept for the end of the run."""
    tc = run.tc
    if run.eval_objective is not None:  # a preference loss and its statistics on the eval pairs
        measured = run.eval_objective.evaluate(run.loss_fn, tc.per_device_train_batch_size)
        run.final_pair_eval = measured if last else None
        metrics = {f"eval_{name}": value for name, value in measured.items()}
    else:
        pad = run.prepared.encoder.tokenizer.pad_token_id
        loss = runner.eval_loss(run.loss_fn, run.eval_samples, tc.per_device_eval_batch_size, pad, show=run.main)
        metrics = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}
    if scores_answers(run):
        scores: dict[str, float] = {}
        if run.main:
            prompts = prompts_scored(run)
            with run.accelerator.autocast():
                answers = runner.answer(run.model, run.prepared.encoder, [(p, t) for p, _, t in prompts],
                                        tc.generation_max_length, tc.per_device_eval_batch_size,
                                        f"model at step {step}")  # fmt: skip
            scores = answer_scores(answers, prompts, run)
        if run.accelerator.num_processes > 1:  # early stopping must stop every process at the same step
            from accelerate.utils import broadcast_object_list

            scores = broadcast_object_list([scores])[0]
        metrics |= scores
    return metrics


def headline(metrics: dict[str, float], chosen: str | None) -> str:
    """The evaluation in a few words for the progress bar: the loss, and the selection metric when another."""
    parts = [f"eval loss {metrics['eval_loss']:.4f}"]
    if chosen and chosen != "eval_loss" and chosen in metrics:
        parts.append(f"{chosen.removeprefix('eval_').replace('_', ' ')} {shown(chosen, metrics[chosen])}")
    return ", ".join(parts)
