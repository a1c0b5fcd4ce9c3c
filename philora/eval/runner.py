"""Held-out evaluation: eval loss and greedy answers to eval prompts, for the base and the fine-tuned model side
by side, scored (eval.metrics) into what eval.json holds.

`philora eval` and the end of `philora train` both go through `evaluate_model`, and their files through
`eval.report.write_results`, so a run's eval.json, eval.md and report.html mean the same whichever command wrote
them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import torch

from philora.data.batching import collate, length_groups, one_per_row
from philora.data.formats import Conversation
from philora.data.render import MESSAGE_KEYS, ChatEncoder, Sample
from philora.eval.metrics import compare, loss_metrics
from philora.model.load import longrope_boundary
from philora.progress import Phase


@torch.no_grad()
def eval_loss(loss_fn: torch.nn.Module, samples: Sequence[Sample], batch_size: int, pad_id: int,
              what: str = "eval loss", show: bool = True) -> float:  # fmt: skip
    """Mean cross-entropy per trained token over the eval samples, in batches of `batch_size` that never mix the
    two sides of a longrope model's original context; its progress shown as the phase `what`."""
    was_training = loss_fn.training
    loss_fn.eval()
    total, count = 0.0, 0
    device = next(loss_fn.parameters()).device
    boundary = longrope_boundary(getattr(loss_fn, "module", loss_fn).model.config)
    with Phase(what, len(samples), "sample", show=show) as phase:
        for group in length_groups([len(s.input_ids) for s in samples], boundary):
            for start in range(0, len(group), batch_size):
                batch_samples = [samples[i] for i in group[start : start + batch_size]]
                batch = collate(batch_samples, one_per_row(len(batch_samples)), pad_id)
                loss, _ = loss_fn(**{k: v.to(device) for k, v in batch.items()})
                total, count = total + loss.item(), count + sum(s.trained for s in batch_samples)
                phase.update(len(batch_samples))
    loss_fn.train(was_training)
    return total / max(count, 1)


Prompt = tuple[list[dict[str, Any]], str, list[dict[str, Any]] | None]  # messages, reference, tools offered


def prompts_and_references(conversations: Sequence[Conversation], encoder: ChatEncoder) -> list[Prompt]:
    """Each conversation's messages before its last assistant message, that message as the reference (its calls
    written as the template writes them), and the tools the conversation offers."""
    prompts = []
    for c in conversations:
        if c.messages is None:  # text rows have no prompt to answer
            continue
        last = max(i for i, m in enumerate(c.messages) if m["role"] == "assistant")
        prompt = [{k: m[k] for k in MESSAGE_KEYS if k in m} for m in c.messages[:last]]
        answer, syntax = c.messages[last], encoder.tool_syntax
        calls = answer.get("tool_calls")
        reference = syntax.answer(answer["content"], calls) if calls and syntax else answer["content"]
        prompts.append((prompt, reference, c.tools))
    return prompts


def generate(
    model: Any,
    encoder: ChatEncoder,
    prompts: Sequence[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]],
    max_new_tokens: int,
    batch_size: int = 16,
    answered: Callable[[int], object] | None = None,
) -> list[str]:
    """Greedy answers through the token loop that chat and serve use (same stop tokens, same left padding),
    `batch_size` prompts (messages, tools) at a time, each cut at the end-of-turn token; `answered(n)` after each
    batch of n."""
    from philora.infer.generation import Row, Settings
    from philora.infer.generation import generate as token_loop

    was_training = model.training
    model.eval()
    encoded = [encoder.ids(messages, True, tools) for messages, tools in prompts]
    keep = [encoder.tool_marker_ids if tools else frozenset() for _, tools in prompts]  # calls stay readable
    # Batches of similar length waste little compute on left padding; answers go back in prompt order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    settings = Settings(max_new_tokens=max_new_tokens)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [Row(encoded[i], settings, keep_special=keep[i]) for i in chunk]
        for i, done in zip(chunk, token_loop(model, encoder, rows), strict=True):
            answers[i] = done.text.strip()
        if answered is not None:
            answered(len(chunk))
    model.train(was_training)
    return answers


def answer(
    model: Any, encoder: ChatEncoder, prompts: Sequence[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]],
    max_new_tokens: int, batch_size: int, who: str,
) -> list[str]:  # fmt: skip
    """`generate`, its progress shown (progress.Phase: a bar on a terminal, lines in a log, its time at the end)."""
    with Phase(f"answers of the {who}", len(prompts), "prompt") as phase:
        return generate(model, encoder, prompts, max_new_tokens, batch_size, phase.update)


def evaluate_model(
    model: Any,
    encoder: ChatEncoder,
    samples: Sequence[Sample],
    prompts: Sequence[Prompt],
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
    from philora.model.loss import TokenLoss

    loss_fn, pad = TokenLoss(model), encoder.tokenizer.pad_token_id
    questions = [(p, t) for p, _, t in prompts]
    losses: dict[str, dict[str, float]] = {}
    if base:
        with model.disable_adapter():
            if samples:
                losses["before"] = loss_metrics(
                    eval_loss(loss_fn, samples, batch_size, pad, "eval loss of the base model")
                )
            if base_answers is None and prompts:
                base_answers = answer(model, encoder, questions, max_new_tokens, batch_size, "base model")
    if samples:
        losses["after"] = loss_metrics(
            eval_loss(loss_fn, samples, batch_size, pad, "eval loss of the fine-tuned model")
        )
    generations = {"before": base_answers} if base_answers is not None and prompts else {}
    if prompts:
        generations["after"] = answer(model, encoder, questions, max_new_tokens, batch_size, "fine-tuned model")
    evaluation = compare(prompts, generations, encoder.tool_syntax)
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

    from philora.versions import library_versions

    return {**library_versions(), "rouge-score": version("rouge-score")}
