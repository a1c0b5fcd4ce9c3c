"""Held-out evaluation: eval loss, and greedy answers to eval prompts scored against the references."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from philora.data.batching import collate, one_per_row
from philora.data.formats import Conversation
from philora.data.render import ChatEncoder, Sample


@torch.no_grad()
def eval_loss(loss_fn: torch.nn.Module, samples: Sequence[Sample], batch_size: int, pad_id: int) -> float:
    """Mean cross-entropy per trained token over the eval samples."""
    was_training = loss_fn.training
    loss_fn.eval()
    total, count = 0.0, 0
    device = next(loss_fn.parameters()).device
    for start in range(0, len(samples), batch_size):
        rows = one_per_row(min(batch_size, len(samples) - start))
        batch = collate(samples[start : start + batch_size], rows, pad_id)
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


@torch.no_grad()
def generate(
    model: Any,
    encoder: ChatEncoder,
    prompts: Sequence[list[dict[str, Any]]],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers, batched with left padding, each cut at the end-of-turn token."""
    tokenizer = encoder.tokenizer
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoded = [encoder.ids(p, generation_prompt=True) for p in prompts]
    # Batches of similar length waste little compute on left padding; answers go back in prompt order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=encoder.stop_ids,
            pad_token_id=pad,
            use_cache=True,
        )
        for i, row in zip(chunk, out[:, width:].tolist(), strict=True):
            cut = next((j for j, t in enumerate(row) if t in encoder.stop_ids), len(row))
            answers[i] = tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
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
    """Exact match (after trimming whitespace); when every reference is a JSON object or array, also the
    share of valid JSON answers and of answers equal to the reference once parsed."""
    n = max(len(references), 1)
    result = {"exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / n}
    refs = [_json(r) for r in references]
    if refs and all(r is not _INVALID for r in refs):
        preds = [_json(p) for p in predictions]
        result["json_valid"] = sum(p is not _INVALID for p in preds) / n
        result["json_match"] = sum(p is not _INVALID and p == r for p, r in zip(preds, refs, strict=True)) / n
    return result


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


def format_comparison(evaluation: dict[str, Any]) -> str:
    """A before/after table of the metrics and one example, for the terminal."""
    runs = [name for name in ("before", "after") if name in evaluation]
    lines = [f"philora: held-out eval, {evaluation['prompts']} prompts, greedy decoding:"]
    lines.append("  " + "metric".ljust(14) + "".join(name.rjust(9) for name in runs))
    for metric in evaluation[runs[-1]]:
        lines.append("  " + metric.ljust(14) + "".join(f"{100 * evaluation[n][metric]:8.1f}%" for n in runs))

    # Show a single-turn prompt the fine-tuned model got right, if there is one: it reads on its own.
    def fits(s: dict[str, Any]) -> bool:
        return len(s["prompt"]) <= 2 and s.get("after", "").strip() == s["reference"].strip()

    example = next((s for s in evaluation["samples"] if fits(s)), evaluation["samples"][0])
    lines.append(f"  example prompt: {example['prompt'][-1]['content']!r}")
    for name in runs:
        lines.append(f"  {name:>6}: {example[name]!r}")
    return "\n".join(lines)
