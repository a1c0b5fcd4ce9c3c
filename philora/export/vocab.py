"""A Hugging Face fast tokenizer as GGUF tokenizer metadata (`tokenizer.ggml.*`), as llama.cpp's converter writes it.

Two kinds are understood, read from the tokenizer's own `tokenizer.json`:
- byte-level BPE (GPT-2 style: SmolLM2, Phi-4-mini): `tokenizer.ggml.model = gpt2`, the tokens spelled in the
  byte alphabet, the merges, and `tokenizer.ggml.pre` naming how text is split before BPE. That split decides
  how every number and space is tokenised, so it is matched exactly against the splits llama.cpp and
  transformers both know (gpt-2, smollm, llama3, qwen2, gpt-4o, ...); an unknown one is refused, not guessed.
- SentencePiece-style BPE with byte fallback (Phi-3/Phi-3.5-mini): `tokenizer.ggml.model = llama`, tokens with
  scores (llama.cpp merges the best-scoring pair, so each token's score is minus the rank of the merge that makes
  it) and token types (byte, control, user-defined); no merges, like llama.cpp's own converter. Only the shape of
  Phi-3's tokenizer.json is accepted (a normalizer that puts ▁ before each piece of text, no pre-tokenizer), which
  is what llama.cpp does; Metaspace splitters put ▁ elsewhere and are refused.
Vocabulary slots past the tokenizer's length (Phi-3 pads its embedding to 32064) become unused `[PADn]` tokens.
The end-of-turn token is written as `eot_token_id` (eos stays the tokenizer's), so runtimes stop at a turn's end.

Phi-3's chat tokens swallow the whitespace after them (`rstrip`), and a GGUF has no field for that: llama.cpp
applies it to every control token except <unk>, <s> and <|endoftext|> when `general.name` contains "phi3" or
"phi-3", and to none otherwise. So the name is chosen to match the tokenizer (see `gguf_name`); verification in
llama.cpp then shows the chat prompts tokenize as the source's do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from philora.errors import UserError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Digits one by one, then GPT-2's split: what llama.cpp calls smollm (also starcoder, refact, ...).
_SHAPE_KEYS = {"ByteLevel": ("type", "use_regex"), "Digits": ("type", "individual_digits")}
_DIGITS_THEN_GPT2 = [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]


@dataclass
class Vocab:
    model: str  # gpt2 | llama
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, eot → id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: str | None = None
    rstrip_specials: bool = False  # control tokens swallow the whitespace after them (Phi-3's chat tokens)

    def add_to(self, writer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        setters = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id,
            "pad": writer.add_pad_token_id,
            "eot": writer.add_eot_token_id,
        }
        for key, token_id in self.special.items():
            setters[key](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def build_vocab(tokenizer: Any, vocab_size: int, end_of_turn_id: int | None) -> Vocab:
    """The GGUF vocabulary of a fast tokenizer for a model with `vocab_size` embedding rows."""
    spec = tokenizer_json(tokenizer)
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer: a {model.get('type')} model; GGUF export handles BPE tokenizers only")
    if len(tokenizer) > vocab_size:
        raise UserError(f"tokenizer: {len(tokenizer)} tokens but the model has {vocab_size} embedding rows")
    if model.get("byte_fallback"):
        vocab = _sentencepiece_vocab(tokenizer, spec, vocab_size)
    else:
        vocab = _byte_level_vocab(tokenizer, spec, vocab_size)
    vocab.special = _special_ids(tokenizer, end_of_turn_id)
    end = tokenizer.added_tokens_decoder.get(end_of_turn_id)
    vocab.rstrip_specials = bool(end is not None and end.rstrip)
    vocab.add_bos, vocab.add_eos = _adds_specials(tokenizer)
    template = tokenizer.chat_template
    vocab.chat_template = template.get("default") if isinstance(template, dict) else template
    return vocab


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("tokenizer: not a fast (tokenizers-backed) tokenizer; GGUF export reads its tokenizer.json")
    return json.loads(backend.to_str())


def _tokens_by_id(tokenizer: Any, vocab_size: int) -> tuple[list[str | None], dict[int, Any]]:
    tokens: list[str | None] = [None] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        tokens[index] = token
    return tokens, dict(tokenizer.added_tokens_decoder)


def _byte_level_vocab(tokenizer: Any, spec: dict[str, Any], vocab_size: int) -> Vocab:
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError("tokenizer: BPE without byte fallback or a byte-level decoder; GGUF has no form for it")
    tokens, added = _tokens_by_id(tokenizer, vocab_size)
    types = []
    for index, token in enumerate(tokens):
        if token is None:
            tokens[index] = f"[PAD{index}]"
            types.append(UNUSED)
        elif index in added:
            types.append(CONTROL if added[index].special else USER_DEFINED)
        else:
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"), spec.get("normalizer"))
    return Vocab("gpt2", pre, tokens, types, merges=merges)  # type: ignore[arg-type]


def pre_tokenizer_name(pre: dict[str, Any] | None, normalizer: dict[str, Any] | None) -> str:
    """llama.cpp's name for the text split a byte-level BPE tokenizer does before merging."""
    # llama.cpp normalizes nothing before a byte-level BPE. Qwen2's NFC changes only text not already in NFC (the
    # usual form); llama.cpp's own converter writes such tokenizers as they are, and so does philora.
    if normalizer is not None and normalizer.get("type") != "NFC":
        kind = normalizer.get("type")
        raise UserError(f"tokenizer: a byte-level BPE with a {kind} normalizer; GGUF has no form for it")
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    shape = [{k: s[k] for k in _SHAPE_KEYS.get(s.get("type"), ("type",)) if k in s} for s in steps]
    if any(s.get("add_prefix_space") for s in steps if s.get("type") == "ByteLevel"):
        raise UserError("tokenizer: a byte-level pre-tokenizer that adds a prefix space; GGUF has no form for it")
    if shape == [{"type": "ByteLevel", "use_regex": True}]:
        return "gpt-2"
    if shape == _DIGITS_THEN_GPT2:
        return "smollm"
    if shape[1:] == [{"type": "ByteLevel", "use_regex": False}] and shape[0].get("type") == "Split":
        isolated = steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
        regex = (steps[0].get("pattern") or {}).get("Regex") if isolated else None
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == regex:
                return name
    raise UserError(
        f"tokenizer: its pre-tokenizer ({json.dumps(shape)}) is none that llama.cpp and transformers both know "
        "(gpt-2, smollm, llama3, qwen2, gpt-4o, ...); writing another name would tokenise text differently"
    )


def _sentencepiece_vocab(tokenizer: Any, spec: dict[str, Any], vocab_size: int) -> Vocab:
    _check_sentencepiece_shape(spec)
    tokens, added = _tokens_by_id(tokenizer, vocab_size)
    rank: dict[str, int] = {}
    for index, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, index)
    unk = tokenizer.unk_token
    types, scores = [], []
    for index, token in enumerate(tokens):
        if token is None:
            tokens[index], kind, score = f"[PAD{index}]", UNUSED, -10000.0
        elif index in added and token != unk:
            kind, score = (CONTROL if added[index].special else USER_DEFINED), -1000.0
        elif token == unk:
            kind, score = UNKNOWN, 0.0
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind, score = BYTE, 0.0
        else:
            kind, score = NORMAL, -float(rank.get(token, -1) + 1)  # single characters: 0, never merged into
        types.append(kind)
        scores.append(score)
    return Vocab("llama", "default", tokens, types, scores=scores, add_space_prefix=True)  # type: ignore[arg-type]


# What transformers' Metaspace does differently from llama.cpp's SentencePiece (a ▁ before every text piece).
_METASPACE_DIFFERENCE = {
    "first": "no ▁ before the text after a special token (each chat turn's first word)",
    "always": "no extra ▁ before text that starts with a space",
    "never": "no ▁ before the text at all",
}


def _check_sentencepiece_shape(spec: dict[str, Any]) -> None:
    """Accept the shape of Phi-3's (and Llama 2's) tokenizer.json: the normalizer puts ▁ before each piece of text
    and turns spaces into ▁, no pre-tokenizer. That is what llama.cpp does with a `llama` vocabulary."""
    normalizer, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    kinds = [(n.get("type"), n.get("prepend") or (n.get("pattern") or {}).get("String")) for n in steps]
    if kinds == [("Prepend", "▁"), ("Replace", " ")] and not pre:
        return
    if pre.get("type") == "Metaspace":
        scheme = pre.get("prepend_scheme", "always")
        difference = _METASPACE_DIFFERENCE.get(scheme, scheme)
        raise UserError(
            f"tokenizer: it splits with Metaspace (prepend_scheme {scheme}: {difference}, where llama.cpp puts a "
            "▁ before every piece of text), so the GGUF would tokenize differently from training; GGUF can carry "
            "Phi-3's own tokenizer.json shape (a ▁-prepending normalizer, no pre-tokenizer), not this one"
        )
    raise UserError("tokenizer: byte-fallback BPE without Phi-3/Llama's ▁ normalizer; GGUF has no form for it")


def _special_ids(tokenizer: Any, end_of_turn_id: int | None) -> dict[str, int]:
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
        "eot": end_of_turn_id,
    }
    return {k: int(v) for k, v in ids.items() if v is not None}


def _adds_specials(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding text adds bos / eos, found by encoding some."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = full[: len(full) - len(plain)] if full[-len(plain) :] == plain else []
    end = full[len(plain) :] if full[: len(plain)] == plain else []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bos is not None and start[-1:] == [bos], eos is not None and end[:1] == [eos]


# llama.cpp (llama-vocab.cpp) keys the rstrip attribute of control tokens on the model's name.
LLAMA_CPP_RSTRIP_NAMES = ("phi-3", "phi3")


def gguf_name(name: str, rstrip_specials: bool) -> str:
    """`general.name` for the file: contains "phi3" exactly when llama.cpp should rstrip the control tokens."""
    named = any(key in name.lower() for key in LLAMA_CPP_RSTRIP_NAMES)
    if rstrip_specials and not named:
        return f"phi3-{name}"
    if not rstrip_specials and named:
        return re.sub("phi-?3", "phi_3", name, flags=re.IGNORECASE)
    return name
