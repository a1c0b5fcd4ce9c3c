"""The chat template and the special tokens a run depends on, with a verdict for each.

The classic silent failures: a pad token equal to the end-of-turn token (masked as padding, so the model never
learns to stop), an end-of-turn token left out of the labels, a stop list without it, a tokenizer with ids beyond
the model's embedding table.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from philora.data import PreparedData
from philora.data.render import IGNORE

PROBE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
]


def name(tokenizer: Any, token_id: int | None) -> str:
    return "none" if token_id is None else f"{tokenizer.convert_ids_to_tokens(token_id)!r} ({token_id})"


def check_tokens(prepared: PreparedData, vocab_size: int, generation_config: Any) -> tuple[dict[str, Any], list[str],
                                                                                             list[str]]:  # fmt: skip
    """(facts, errors, warnings) of the template and the eos, pad and end-of-turn tokens."""
    encoder = prepared.encoder
    tokenizer = encoder.tokenizer
    eot, eos, pad = encoder.end_of_turn_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    errors, warnings = [], []
    trained_ends, all_ends = _end_of_turn_counts(prepared, eot)
    trained_tokens = sum(s.trained for s in prepared.train.samples)
    model_eos = getattr(generation_config, "eos_token_id", None)
    model_eos = {model_eos} if isinstance(model_eos, int) else set(model_eos or [])
    stops = set(encoder.stop_ids) | model_eos  # what philora's generation stops at (infer/generation.py)
    facts = {
        "rendered": encoder.render(PROBE),
        "eos": name(tokenizer, eos),
        "pad": name(tokenizer, pad),
        "end_of_turn": name(tokenizer, eot),
        "end_of_turn_trained": f"{trained_ends} of {all_ends} in the training samples",
        "generation_stops_at": ", ".join(name(tokenizer, i) for i in sorted(stops)),
        "verdicts": {
            "pad is not end-of-turn or eos": pad is not None and pad not in (eot, eos),
            "end-of-turn trained": bool(trained_ends) or not trained_tokens,
            "generation stops on it": eot in stops,
        },
        "tokenizer_ids": len(tokenizer),
        "model_vocabulary": vocab_size,
    }
    if pad is None or pad in (eot, eos):
        errors.append(f"tokenizer: the pad token {name(tokenizer, pad)} is the end-of-turn or eos token, so it would "
                      "be masked as padding; add a distinct pad token to the tokenizer")  # fmt: skip
    if trained_tokens and not trained_ends:
        errors.append(
            f"data: no training sample has its end-of-turn token {name(tokenizer, eot)} among the trained tokens, so "
            "the model would never learn to stop; check data.train_on and the chat template"
        )
    if eot not in stops:
        errors.append(f"generation: {name(tokenizer, eot)} is not among the stop tokens; the model would not stop")
    if eot not in model_eos:
        warnings.append(
            f"generation: the base model's generation_config does not stop at {name(tokenizer, eot)}; philora's "
            "eval, chat, serve and merge stop there, other tools given the base model alone may not"
        )
    if len(tokenizer) > vocab_size:
        errors.append(
            f"tokenizer: {len(tokenizer)} ids but the model's embedding has {vocab_size} rows; ids past it would fail "
            "at the first step: use the model's own tokenizer"
        )
    return facts, errors, warnings


def _end_of_turn_counts(prepared: PreparedData, eot: int) -> tuple[int, int]:
    """(trained, all) occurrences of the end-of-turn token in the training samples."""
    trained = every = 0
    for sample in prepared.train.samples:
        at = sample.input_ids == eot
        every += int(np.count_nonzero(at))
        trained += int(np.count_nonzero(at & (sample.labels != IGNORE)))
    return trained, every


def generation_config(source: str, model_config: Any, revision: str | None) -> Any:
    """The model's generation_config.json, or one made from its config when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source, revision=revision)
    except OSError:
        return GenerationConfig.from_model_config(model_config)
