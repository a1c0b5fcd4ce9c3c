"""The metric table of an evaluation, base beside fine-tuned with the difference, for the terminal; the rows and
formats the Markdown and HTML reports share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# What eval.json calls the two models, and what people read: "before" is the base model (before fine-tuning,
# or with the adapter disabled), "after" the fine-tuned one. The keys predate `philora eval`; run.json keeps them.
RUNS = {"before": "base", "after": "fine-tuned"}


# (key, label, kind) in table order. Kinds: loss and ppl (lower is better), score (a share, shown in %).
METRICS = (
    ("eval_loss", "eval loss", "loss"),
    ("perplexity", "perplexity", "ppl"),
    ("exact_match", "exact match", "score"),
    ("rouge_l", "ROUGE-L F1", "score"),
    ("json_valid", "JSON valid", "score"),
    ("json_match", "JSON match", "score"),
    ("tool_valid_call", "valid calls", "score"),
    ("tool_name", "call names", "score"),
    ("tool_arguments", "call arguments", "score"),
    ("tool_no_call", "no call needed", "score"),
    ("tool_decision", "call or not", "score"),
)


def metric_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """The metrics present, each with its value per model (None where absent) and after - before."""
    runs = present_runs(evaluation)
    rows = []
    for key, label, kind in METRICS:
        where = evaluation.get("loss", {}) if kind != "score" else evaluation
        values = {run: where.get(run, {}).get(key) for run in runs}
        if any(v is not None for v in values.values()):
            before, after = values.get("before"), values.get("after")
            delta = after - before if before is not None and after is not None else None
            rows.append({"key": key, "label": label, "kind": kind, **values, "delta": delta})
    return rows


def present_runs(evaluation: dict[str, Any]) -> list[str]:
    return [r for r in RUNS if r in evaluation or r in evaluation.get("loss", {})]


def format_value(kind: str, value: float | None) -> str:
    if value is None:
        return "–"
    return {"loss": f"{value:.4f}", "ppl": f"{value:.2f}"}.get(kind, f"{100 * value:.1f}%")


def format_delta(kind: str, delta: float | None) -> str:
    if delta is None:
        return ""
    return {"loss": f"{delta:+.4f}", "ppl": f"{delta:+.2f}"}.get(kind, f"{100 * delta:+.1f} pts")


def format_preference(preference: dict[str, Any], method: str) -> str:
    """A preference run's held-out pairs: its loss, how often the chosen answer earns the higher reward, by what."""
    return (
        f"held-out pairs ({preference['pairs']}): {method} loss {preference['loss']:.4f}, reward accuracy "
        f"{100 * preference['rewards/accuracies']:.1f}%, reward margin {preference['rewards/margins']:.3f}"
    )


def format_comparison(evaluation: dict[str, Any]) -> str:
    """The metric table (base vs fine-tuned, with the difference) and one example, for the terminal."""
    runs = present_runs(evaluation)
    rows = metric_rows(evaluation)
    prompts = evaluation["prompts"]
    how = f"{prompts} prompts, greedy decoding" if prompts else "no prompts to answer (text rows), loss only"
    lines = [f"philora: held-out eval, {how}:"]
    both = len(runs) == 2
    lines.append("  " + "metric".ljust(14) + "".join(RUNS[r].rjust(12) for r in runs) + ("Δ".rjust(12) if both else ""))
    for row in rows:
        cells = "".join(format_value(row["kind"], row[r]).rjust(12) for r in runs)
        lines.append(
            "  " + row["label"].ljust(14) + cells + (format_delta(row["kind"], row["delta"]).rjust(12) if both else "")
        )
    if evaluation["samples"]:
        example = pick_example(evaluation["samples"])
        question = example["prompt"][-1]["content"] if example["prompt"] else ""
        lines.append(f"  example prompt: {question!r}")
        for run in (r for r in runs if r in example):
            lines.append(f"  {RUNS[run]:>10}: {example[run]!r}")
    return "\n".join(lines)


def pick_example(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A single-turn prompt the fine-tuned model got right, if there is one: it reads on its own."""

    def fits(s: dict[str, Any]) -> bool:
        return len(s["prompt"]) <= 2 and s.get("after", "").strip() == s["reference"].strip()

    return next((s for s in samples if fits(s)), samples[0])
