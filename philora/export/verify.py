"""A GGUF (or a base GGUF + a GGUF LoRA) checked in llama.cpp against the model it came from in transformers.

`reference()` computes, once, what transformers says: the prompts' tokens, fp32 logits at every position, greedy
answers, and for longrope models the logits of a sequence past the original context. `verify()` asks llama.cpp
the same, and `problems()` judges the record against the type's floors (see command.py for how they were set).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from philora.export import layouts, llamacpp
from philora.export.merge import PARITY_CONVERSATIONS, compare, logits_of, parity_line, parity_prompts
from philora.infer.generation import Row, Settings, generate

# What each type is judged by. Float types and q8_0 round every weight by a known small amount, so the largest
# |Δlogit| relative to the logit scale is bounded (llama.cpp also keeps its KV cache in f16). The 4- and 5-bit types
# move logits too much for such a bound, so they are judged by top-1 agreement over the prompt positions; the
# floors come from the embedded 135M model, the worst case (see command.py), and lie far above what a wrong layout
# gives (a few percent).
BOUNDS: dict[str, tuple[str, float]] = {
    "f32": ("relative", 1e-2),
    "f16": ("relative", 1e-2),
    "bf16": ("relative", 5e-2),
    "q8_0": ("relative", 0.15),
    "q5_k_m": ("top1", 0.70),
    "q4_k_m": ("top1", 0.70),
    "q4_0": ("top1", 0.50),
}
# Text whose tokenisation depends on the pre-tokenizer: digit runs, space runs, contractions, non-ASCII.
TOKENIZER_PROBES = [
    "In 2024, 12345 people paid $3.50 each — didn't they?",
    "  two  spaces,\ttab\nnewline  ",
    "Grüße, naïve café: 東京 🚀",
]
ANSWER_TOKENS = 48
# llama.cpp's context for the prompt checks: the parity prompts and their answers fit, and it stays small, since
# llama-cpp-python keeps logits for every position of it (512 × 200k floats for Phi-4-mini's vocabulary).
SHORT_CONTEXT = 512
LONG_EXTRA = 64  # positions checked past a longrope model's original context


@dataclass
class Reference:
    """What transformers says about the source model, for llama.cpp to be compared with."""

    config: Any
    tokenizer: Any
    encoder: Any  # ChatEncoder: chat template, end-of-turn and stop ids
    prompts: list[list[int]]
    logits: list[torch.Tensor]  # fp32, every position of each prompt
    answers: list[tuple[str, str]]  # greedy (text, finish reason), one per parity conversation
    long_ids: list[int]  # longrope only: a sequence past the original context
    long_logits: torch.Tensor | None  # at the positions past the original context only


def reference(model: Any, config: Any, tokenizer: Any, encoder: Any) -> Reference:
    """The source's side of every check (`model` in fp32, eval mode, with any adapter applied)."""
    prompts = parity_prompts(encoder)
    rows = [Row(ids, Settings(max_new_tokens=ANSWER_TOKENS)) for ids in prompts]
    completions = [generate(model, encoder, [row])[0] for row in rows]  # one at a time: no padding
    answers = [(c.text, c.finish_reason) for c in completions]
    long_ids: list[int] = []
    long_logits = None
    if layouts.is_longrope(config):
        want = layouts.original_context(config) + LONG_EXTRA
        text = " ".join(TOKENIZER_PROBES + [m["content"] for c in PARITY_CONVERSATIONS for m in c])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        long_ids = (ids * (want // len(ids) + 1))[:want]
        print(f"philora: transformers on {want} tokens (past the original context of this longrope model)…",
              file=sys.stderr)  # fmt: skip
        long_logits = logits_of(model, [long_ids])[0][want - LONG_EXTRA :]
    return Reference(config, tokenizer, encoder, prompts, logits_of(model, prompts), answers, long_ids, long_logits)


def verify(gguf_path: Path, ref: Reference, qtype: str, lora: Path | None = None) -> dict[str, Any]:
    """llama.cpp's tokens, template, logits and answers for the GGUF (with `lora` applied), beside the reference;
    a file llama.cpp refuses to load gives a record with only that reason."""
    try:
        return compare_in_llama_cpp(gguf_path, ref, qtype, lora)
    except llamacpp.LoadError as e:
        return {"verified_with": llamacpp.version(), "load_error": str(e)}


def compare_in_llama_cpp(gguf_path: Path, ref: Reference, qtype: str, lora: Path | None) -> dict[str, Any]:
    measure, limit = BOUNDS[qtype]
    relative_bound, top1_floor = (limit, None) if measure == "relative" else (None, limit)
    # A longrope model uses its short factors while llama.cpp's context is within the original one.
    longrope = layouts.is_longrope(ref.config)
    limit = layouts.original_context(ref.config) if longrope else ref.config.max_position_embeddings
    short_context = min(limit, SHORT_CONTEXT)
    with llamacpp.loaded(gguf_path, short_context, lora) as model:
        mismatch = tokenizer_mismatch(model, ref)
        parity = compare(ref.logits, [llamacpp.logits(model, ids) for ids in ref.prompts], relative_bound or math.inf)
        answers = []
        for conversation, (expected, expected_finish) in zip(PARITY_CONVERSATIONS, ref.answers, strict=True):
            text, finish = llamacpp.answer(model, conversation, ANSWER_TOKENS)
            answers.append({"transformers": expected, "llama.cpp": text, "finish": [expected_finish, finish]})
    record: dict[str, Any] = {
        "verified_with": f"llama.cpp ({llamacpp.version()}): tokens, chat template, logits, greedy answers",
        "tokenizer_identical": mismatch is None,
        "tokenizer_mismatch": mismatch,
        "parity": {**asdict(parity), "tolerance": relative_bound, "top1_floor": top1_floor},
        "answers_identical": sum(a["transformers"].strip() == a["llama.cpp"].strip() for a in answers),
        # llama.cpp stopped at the end-of-turn token where transformers did, and ran on where it did
        "answers_stopped_alike": sum(a["finish"][0] == a["finish"][1] for a in answers),
        "answers": answers,
    }
    if ref.long_logits is not None:
        past = layouts.original_context(ref.config)
        with llamacpp.loaded(gguf_path, len(ref.long_ids), lora) as model:
            got = llamacpp.logits(model, ref.long_ids)
        long = compare([ref.long_logits], [got[past:]], relative_bound or math.inf)
        record["long_context"] = {**asdict(long), "tolerance": relative_bound, "top1_floor": top1_floor, "from": past}
    return record


def tokenizer_mismatch(model: Any, ref: Reference) -> str | None:
    """None when llama.cpp encodes the parity prompts and probes exactly like the source and renders the chat
    template to the same text; else the first difference."""
    texts = [ref.encoder.render(m, True) for m in PARITY_CONVERSATIONS] + TOKENIZER_PROBES
    for text in texts:
        want = ref.tokenizer(text, add_special_tokens=False)["input_ids"]
        got = llamacpp.tokenize(model, text)
        if want != got:
            return f"{text[:40]!r}: {want[:12]}… vs {got[:12]}…"
    for conversation in PARITY_CONVERSATIONS:
        if llamacpp.render(model, conversation) != ref.encoder.render(conversation, True):
            return "llama.cpp renders the file's chat template differently from transformers"
    return None


def problems(record: dict[str, Any]) -> list[str]:
    """What makes the file unusable, one line each; empty when it passed."""
    if "load_error" in record:
        return [f"llama.cpp does not load it: {record['load_error']}"]
    found = []
    if not record["tokenizer_identical"]:
        found.append(f"its tokenizer or chat template differs from the source's: {record['tokenizer_mismatch']}")
    for key, what in (("parity", "prompt positions"), ("long_context", "positions past the original context")):
        check = record.get(key)
        if check is None:
            continue
        if check["top1_floor"] is not None and check["top1_agreement"] < check["top1_floor"]:
            found.append(
                f"llama.cpp's top-1 token agrees with transformers' at {check['top1_agreement']:.1%} of the {what} "
                f"(< {check['top1_floor']:.0%})"
            )
        if check["tolerance"] is not None and check["relative"] > check["tolerance"]:
            found.append(
                f"its logits differ by {check['relative']:.2e} of the logit scale on the {what} "
                f"(> {check['tolerance']:.2g})"
            )
    return found


def summary(what: str, record: dict[str, Any]) -> str:
    """What stderr says of the check: the parity line (merge's format), the same past a longrope model's original
    context, and how the greedy answers compare."""
    if "load_error" in record:
        return f"philora: {what}: llama.cpp does not load it"
    lines = [parity_line(f"{what} in llama.cpp vs transformers", record["parity"])]
    if "long_context" in record:
        long = record["long_context"]
        lines.append(parity_line(f"{what} past {long['from']} tokens", long))
    n = len(record["answers"])
    lines.append(
        f"philora: {what} greedy answers: {record['answers_identical']}/{n} identical to transformers', "
        f"{record['answers_stopped_alike']}/{n} stopped alike"
    )
    return "\n".join(lines)
