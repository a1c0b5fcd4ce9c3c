"""Held-out evaluation: eval loss and perplexity, and greedy answers to eval prompts scored against the
references (exact match, ROUGE-L, JSON validity and match), for the base and the fine-tuned model side by side.

`philora eval` and the end of `philora train` both go through `evaluate_model` and `write_results`, so a run's
eval.json, eval.md and report.html mean the same thing whichever command wrote them.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from philora.data.batching import collate, length_groups, one_per_row
from philora.data.formats import Conversation
from philora.data.render import ChatEncoder, Sample

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
)


@torch.no_grad()
def eval_loss(loss_fn: torch.nn.Module, samples: Sequence[Sample], batch_size: int, pad_id: int) -> float:
    """Mean cross-entropy per trained token over the eval samples, in batches of `batch_size` that never mix the
    two sides of a longrope model's original context."""
    from philora.model import longrope_boundary

    was_training = loss_fn.training
    loss_fn.eval()
    total, count = 0.0, 0
    device = next(loss_fn.parameters()).device
    boundary = longrope_boundary(getattr(loss_fn, "module", loss_fn).model.config)
    for group in length_groups([len(s.input_ids) for s in samples], boundary):
        for start in range(0, len(group), batch_size):
            batch_samples = [samples[i] for i in group[start : start + batch_size]]
            batch = collate(batch_samples, one_per_row(len(batch_samples)), pad_id)
            loss, n = loss_fn(**{k: v.to(device) for k, v in batch.items()})
            total, count = total + loss.item(), count + int(n)
    loss_fn.train(was_training)
    return total / max(count, 1)


def prompts_and_references(conversations: Sequence[Conversation]) -> list[tuple[list[dict[str, Any]], str]]:
    """Each conversation's messages before its last assistant message, and that message as the reference."""
    pairs = []
    for c in conversations:
        if c.messages is None:  # text rows have no prompt to answer
            continue
        last = max(i for i, m in enumerate(c.messages) if m["role"] == "assistant")
        prompt = [{"role": m["role"], "content": m["content"]} for m in c.messages[:last]]
        pairs.append((prompt, c.messages[last]["content"]))
    return pairs


def generate(
    model: Any,
    encoder: ChatEncoder,
    prompts: Sequence[list[dict[str, Any]]],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers through the token loop that chat and serve use (same stop tokens, same left padding),
    `batch_size` prompts at a time, each cut at the end-of-turn token."""
    from philora.generation import Row, Settings
    from philora.generation import generate as token_loop

    was_training = model.training
    model.eval()
    encoded = [encoder.ids(p, generation_prompt=True) for p in prompts]
    # Batches of similar length waste little compute on left padding; answers go back in prompt order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    settings = Settings(max_new_tokens=max_new_tokens)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, done in zip(chunk, token_loop(model, encoder, [Row(encoded[i], settings) for i in chunk]), strict=True):
            answers[i] = done.text.strip()
    model.train(was_training)
    return answers


_INVALID = object()


def _json(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return _INVALID
    return value if isinstance(value, (dict, list)) else _INVALID


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match (after trimming whitespace) and mean ROUGE-L F1; when every reference is a JSON object or
    array, also the share of valid JSON answers and of answers equal to the reference once parsed."""
    n = max(len(references), 1)
    result = {"exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / n}
    result["rouge_l"] = rouge_l(predictions, references)
    refs = [_json(r) for r in references]
    if refs and all(r is not _INVALID for r in refs):
        preds = [_json(p) for p in predictions]
        result["json_valid"] = sum(p is not _INVALID for p in preds) / n
        result["json_match"] = sum(p is not _INVALID and p == r for p, r in zip(preds, refs, strict=True)) / n
    return result


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (longest common subsequence of words) from the `rouge-score` library, with its default
    tokenizer: lower-cased runs of ASCII letters and digits, no stemming. Text with none of those scores 0."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / max(len(scores), 1)


def compare(prompts: Sequence[tuple[list[dict[str, Any]], str]], generations: dict[str, list[str]]) -> dict[str, Any]:
    """Scores of each generation run ('before', 'after') on the same prompts, with the answers side by side."""
    references = [r for _, r in prompts]
    samples = [
        {"prompt": p, "reference": r, **{name: answers[i] for name, answers in generations.items()}}
        for i, (p, r) in enumerate(prompts)
    ]
    return {
        "prompts": len(prompts),
        **{name: score(answers, references) for name, answers in generations.items()},
        "samples": samples,
    }


def loss_metrics(loss: float) -> dict[str, float]:
    # exp capped as in metrics.jsonl's eval_ppl, so a diverged model gives a large number, not an overflow
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50))}


def answer(
    model: Any, encoder: ChatEncoder, prompts: Sequence[list[dict[str, Any]]], max_new_tokens: int, batch_size: int,
    who: str,
) -> list[str]:  # fmt: skip
    """`generate`, saying how long it took."""
    tick = time.perf_counter()
    answers = generate(model, encoder, prompts, max_new_tokens, batch_size)
    seconds = time.perf_counter() - tick
    print(f"philora: answered {len(prompts)} eval prompts with the {who} in {seconds:.0f}s", file=sys.stderr)
    return answers


def evaluate_model(
    model: Any,
    encoder: ChatEncoder,
    samples: Sequence[Sample],
    prompts: Sequence[tuple[list[dict[str, Any]], str]],
    *,
    batch_size: int,
    max_new_tokens: int,
    base: bool = True,
    base_answers: list[str] | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Eval loss on `samples` and greedy answers to `prompts` from a peft model, scored; with `base`, the same
    for the base model, reached by disabling the adapter (the model is loaded once). `base_answers` are the base
    model's answers when they were generated already (train does so before LoRA is applied); without `base` they
    are compared but no base loss is computed. Returns what eval.json holds."""
    from philora.loss import TokenLoss

    loss_fn, pad = TokenLoss(model), encoder.tokenizer.pad_token_id
    questions = [p for p, _ in prompts]
    losses: dict[str, dict[str, float]] = {}
    if base:
        with model.disable_adapter():
            if samples:
                losses["before"] = loss_metrics(eval_loss(loss_fn, samples, batch_size, pad))
            if base_answers is None and prompts:
                base_answers = answer(model, encoder, questions, max_new_tokens, batch_size, "base model")
    if samples:
        losses["after"] = loss_metrics(eval_loss(loss_fn, samples, batch_size, pad))
    generations = {"before": base_answers} if base_answers is not None and prompts else {}
    if prompts:
        generations["after"] = answer(model, encoder, questions, max_new_tokens, batch_size, "fine-tuned model")
    evaluation = compare(prompts, generations)
    evaluation["loss"] = losses
    evaluation["settings"] = {
        **(settings or {}),
        "loss_samples": len(samples),
        "loss_tokens": sum(s.trained for s in samples),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    evaluation["versions"] = versions()
    return evaluation


def versions() -> dict[str, str | None]:
    from importlib.metadata import version

    from philora.report import library_versions

    return {**library_versions(), "rouge-score": version("rouge-score")}


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


def write_results(out: Path, evaluation: dict[str, Any], run_dir: Path | None) -> list[Path]:
    """eval.json, eval.md and report.html in `out`; the report shows the run in `run_dir` (its run.json and the
    loss curve from its metrics.jsonl) when there is one."""
    from philora import html_report

    out.mkdir(parents=True, exist_ok=True)
    run, records = html_report.read_run(run_dir)
    files = {
        "eval.json": json.dumps(evaluation, indent=2, ensure_ascii=False) + "\n",
        "eval.md": html_report.markdown(evaluation),
        "report.html": html_report.render(evaluation, run, records),
    }
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return [out / name for name in files]
