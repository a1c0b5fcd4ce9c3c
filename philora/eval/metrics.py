"""Scores of answers against references: exact match, ROUGE-L, JSON validity and match; eval loss as perplexity."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

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
