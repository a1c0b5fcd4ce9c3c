"""Scores of answers against references: exact match, ROUGE-L, JSON validity and match, tool calls; eval loss as
perplexity."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from philora.data.tools import Syntax, argument_problem

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


def tool_scores(
    predictions: Sequence[str], references: Sequence[str], tools: Sequence[list[dict[str, Any]] | None], syntax: Syntax
) -> dict[str, float]:
    """How answers to prompts that offer tools call them, the calls read from the text with the template's syntax:
    - tool_valid_call: where the reference calls, answers whose calls all parse, name an offered tool and fit its
      schema's required arguments;
    - tool_name: where the reference calls, answers calling the same functions (as a multiset, any order);
    - tool_arguments: where the reference calls, answers making the same calls with equal arguments (any order);
    - tool_no_call: where the reference answers without a call, answers that make none (a model that never
      calls scores 100% here; hence the next one);
    - tool_decision: answers that call where the reference calls and make no call where it makes none."""
    calling, plain = [], []
    for prediction, reference, offered in zip(predictions, references, tools, strict=True):
        if offered:
            wanted = syntax.parse(reference)[1]
            (calling if wanted else plain).append((syntax.parse(prediction)[1], wanted, offered))
    result: dict[str, float] = {}
    if calling:
        n = len(calling)
        result["tool_valid_call"] = sum(bool(got) and _valid(got, offered) for got, _, offered in calling) / n
        result["tool_name"] = sum(_names(got) == _names(wanted) for got, wanted, _ in calling) / n
        result["tool_arguments"] = sum(_calls(got) == _calls(wanted) for got, wanted, _ in calling) / n
    if plain:
        result["tool_no_call"] = sum(not got for got, _, _ in plain) / len(plain)
    decided = [bool(got) for got, _, _ in calling] + [not got for got, _, _ in plain]
    if decided:
        result["tool_decision"] = sum(decided) / len(decided)
    return result


def _valid(calls: list[dict[str, Any]], offered: list[dict[str, Any]]) -> bool:
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in offered}
    return all(c["name"] in schemas and argument_problem(c["arguments"], schemas[c["name"]]) is None for c in calls)


def _names(calls: list[dict[str, Any]]) -> list[str]:
    return sorted(c["name"] for c in calls)


def _calls(calls: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps([c["name"], c["arguments"]], sort_keys=True) for c in calls)


def compare(
    prompts: Sequence[tuple[list[dict[str, Any]], str, list[dict[str, Any]] | None]],
    generations: dict[str, list[str]],
    syntax: Syntax | None = None,
) -> dict[str, Any]:
    """Scores of each generation run ('before', 'after') on the same prompts (messages, reference, tools), with
    the answers side by side; tool-call scores where prompts offer tools and the template has a call syntax."""
    references = [r for _, r, _ in prompts]
    tools = [t for _, _, t in prompts]
    samples = [
        {"prompt": p, "reference": r, **({"tools": t} if t else {}), **{n: a[i] for n, a in generations.items()}}
        for i, (p, r, t) in enumerate(prompts)
    ]
    scores = {name: score(answers, references) for name, answers in generations.items()}
    if syntax is not None and any(tools):
        for name, answers in generations.items():
            scores[name] |= tool_scores(answers, references, tools, syntax)
    return {"prompts": len(prompts), **scores, "samples": samples}


def loss_metrics(loss: float) -> dict[str, float]:
    # exp capped as in metrics.jsonl's eval_ppl, so a diverged model gives a large number, not an overflow
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50))}
