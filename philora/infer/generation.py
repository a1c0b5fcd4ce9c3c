"""Streaming generation for `philora chat` and `philora serve`: one token loop, batched with left padding.

Prompts are rendered with the model's own chat template through `ChatEncoder`, the same code path that built
the training data, so the model answers the prompts it was trained on. The loop is philora's own rather than
`model.generate`: it gives each row of a batch its own settings (length, temperature, top-p, seed, stop
strings), streams each row's text as it grows, lets a row be cancelled, and drops finished rows from the batch.
The end-of-turn token ends an answer and is never part of its text.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from philora.data.formats import RowProblem
from philora.data.render import MESSAGE_KEYS, ChatEncoder
from philora.infer.stops import StopText


class BadPrompt(ValueError):
    """The messages cannot be turned into a prompt (bad roles, special tokens in the text, too long)."""


SEEDS = (-(1 << 63), (1 << 63) - 1)  # a seed is an int64: torch's generator refuses more (and the wire is JSON)
# Below this temperature sampling is greedy but for exact ties (a token 1e-3 under the best logit has a probability
# under e^-100), so it is done greedily; a temperature under float32's range (1e-300) would otherwise be 0, and the
# softmax of 0 / 0 is NaN, which fails the sampling.
GREEDY_BELOW = 1e-5


@dataclass
class Settings:
    """How one answer is generated."""

    max_new_tokens: int = 256  # longest answer in tokens
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling threshold when temperature > 0
    seed: int | None = None  # sampling seed; None = fresh randomness
    stop: tuple[str, ...] = ()  # strings that end the answer (not included in it)

    def problems(self, names: dict[str, str] | None = None) -> list[str]:
        """One line per bad value; `names` maps a field to the flag or JSON key the user wrote it as."""
        name = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed"}
        name |= names or {}
        found = []
        if self.max_new_tokens < 1:
            found.append(f"{name['max_new_tokens']}: {self.max_new_tokens}; give a number of tokens >= 1")
        if not 0 <= self.temperature <= 2:
            found.append(f"{name['temperature']}: {self.temperature}; give a value from 0 (greedy) to 2")
        if not 0 < self.top_p <= 1:
            found.append(f"{name['top_p']}: {self.top_p}; give a value in (0, 1]")
        if self.seed is not None and not SEEDS[0] <= self.seed <= SEEDS[1]:
            found.append(f"{name['seed']}: {self.seed}; give a 64-bit integer ({SEEDS[0]} to {SEEDS[1]})")
        return found


@dataclass
class Completion:
    text: str
    # "stop": end of turn or a stop string; "length": max_new_tokens or the context; "cancelled";
    # "error": the row's own sampling or callbacks failed (generate with isolate=True), the exception in `error`
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: Exception | None = None


@dataclass
class Row:
    """One answer to generate in a batch: its prompt, its settings, where its text goes as it grows."""

    prompt_ids: list[int]
    settings: Settings = field(default_factory=Settings)
    on_text: Callable[[str], None] | None = None
    cancelled: Callable[[], bool] | None = None
    keep_special: frozenset[int] = frozenset()  # special tokens that stay in the text (a tool syntax's markers)


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def prompt_ids(
    encoder: ChatEncoder,
    messages: Sequence[dict[str, Any]],
    context: int | None = None,
    tools: list[dict[str, Any]] | None = None,
    prefill: str = "",
) -> list[int]:
    """The token ids the model sees before it answers `messages`; BadPrompt if they cannot be one. Messages are
    {role, content} and, in a conversation with tools, tool_calls (tools.check_calls's shape) or a tool result's
    tool_call_id and name. `tools` (tools.check_tools's shape) go where the template shows them; `prefill` is text
    the answer is made to start with (the opening of a tool call the request demands)."""
    clean = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadPrompt(f"messages[{i}].role: {role!r}; give one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadPrompt(f"messages[{i}].content: give the text as a string")
        clean.append({**{k: m[k] for k in MESSAGE_KEYS if k in m}, "role": ROLES[role], "content": content})
    try:
        encoder.refuse_special_text(clean, tools)  # a special token in the text would be read as a control token
        text = encoder.render(clean, generation_prompt=True, tools=tools) + prefill
    except RowProblem as e:
        raise BadPrompt(str(e)) from None
    ids = _measured_ids(encoder, text, context) if context is not None else encoder.tokenize([text])[0]
    if context is not None and len(ids) >= context:
        raise BadPrompt(f"the prompt is {len(ids)} tokens; the model's context is {context} tokens")
    return ids


CHARS_PER_TOKEN = 4  # the first prefix measured holds the context at about 4 characters a token (English text)
CUT_TOKENS = 16  # more than a cut can add to a prefix's count: the word or special token it splits in two


def _measured_ids(encoder: ChatEncoder, text: str, context: int) -> list[int]:
    """The ids of `text`, or BadPrompt as soon as a prefix of it is over `context` tokens: prefixes twice as long
    each time, from `context` * 4 characters. Tokenizing a 4 MB text whole holds about a million tokens (hundreds of
    MB in the tokenizer); this way what is tokenized stays under about twice the text the context can hold, which
    the whole text is too when it fits."""
    size = context * CHARS_PER_TOKEN
    while size < len(text):
        ids = encoder.tokenize([text[:size]])[0]
        if len(ids) >= context + CUT_TOKENS:
            raise BadPrompt(
                f"the prompt is over {len(ids) - CUT_TOKENS} tokens (its first {size} characters alone); "
                f"the model's context is {context} tokens"
            )
        size *= 2
    return encoder.tokenize([text])[0]


def context_length(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


class Detokenizer:
    """Text of a growing token list, released in pieces that never split a multi-byte character.

    Decoding one token at a time loses spaces (SentencePiece drops a word's leading space at the start of a
    decode) and splits characters spread over byte tokens. So the tokens from one step back are decoded
    together and only the text past the old part is released, once it no longer ends in a partial character.
    Special tokens are left out of the text: all of them, or only those in `drop` where some must stay (a tool
    syntax's markers are special tokens in some tokenizers, Phi-4-mini's `<|tool_call|>`, and calls are read by
    them).
    """

    def __init__(self, tokenizer: Any, drop: frozenset[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.drop = drop  # the special tokens left out of the text; None: all of them
        self.ids: list[int] = []
        self.prefix = 0  # start of the window that is decoded for context
        self.read = 0  # tokens before this have been released as text

    def _decode(self, ids: list[int]) -> str:
        if self.drop is None:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode([i for i in ids if i not in self.drop], skip_special_tokens=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._release(final=False)

    def flush(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        old = self._decode(self.ids[self.prefix : self.read])
        new = self._decode(self.ids[self.prefix :])
        if len(new) <= len(old) or (new.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return new[len(old) :]


class _Answer:
    """The state of one row while it generates."""

    def __init__(self, row: Row, encoder: ChatEncoder, limit: int) -> None:
        self.row = row
        self.sampler: torch.Generator | None = None
        self.limit = limit  # tokens it may still generate: max_new_tokens, or less where the context ends
        self.tokens = 0
        self.pieces: list[str] = []
        self.finish: str | None = None
        self.error: Exception | None = None
        drop = frozenset(encoder.special_ids - row.keep_special) if row.keep_special else None
        self.detokenizer = Detokenizer(encoder.tokenizer, drop)
        self.stop_text = StopText(row.settings.stop)

    def emit(self, text: str) -> None:
        text = self.stop_text.feed(text)
        if self.stop_text.hit:
            self.finish = "stop"
        self.release(text)

    def release(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            if self.row.on_text is not None:
                self.row.on_text(text)

    def take(self, token: int, stop_ids: set[int]) -> None:
        if token in stop_ids:
            self.finish = "stop"
        else:
            self.tokens += 1
            self.emit(self.detokenizer.push(token))
        if self.finish is None and self.tokens >= self.limit:
            self.finish = "length"
        if self.finish is None and self.row.cancelled is not None and self.row.cancelled():
            self.finish = "cancelled"
        if self.finish is not None and not self.stop_text.hit:
            self.emit(self.detokenizer.flush())
            if not self.stop_text.hit:  # the end held back may have become a stop string; it cannot now
                self.release(self.stop_text.flush())

    def completion(self) -> Completion:
        text = "".join(self.pieces)
        return Completion(text, self.finish or "length", len(self.row.prompt_ids), self.tokens, self.error)

    def guarded(self, isolate: bool, action: Callable[..., Any], *args: Any) -> Any:
        """action(*args), a step of this row's own (its sampler, its sampling, its text); where it fails and rows
        are isolated, the row ends with the error (None is returned) and the others go on."""
        try:
            return action(*args)
        except Exception as e:
            if not isolate:
                raise
            self.finish, self.error = "error", e
            return None


def stop_ids(model: Any, encoder: ChatEncoder) -> set[int]:
    """The encoder's end-of-turn and eos ids, and any other eos the model's generation config names
    (Phi-3 lists `<|assistant|>` there too)."""
    ids = set(encoder.stop_ids)
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([extra] if isinstance(extra, int) else (extra or []))
    return ids


def _forward_kwargs(model: Any) -> dict[str, Any]:
    """A fresh KV cache under the name this transformers version uses (5.x renamed `past_key_values` to `cache`;
    the old name warns), and `logits_to_keep` where the forward takes it (remote code may not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    takes = inspect.signature(base.forward).parameters
    kwargs = {"cache" if "cache" in takes else "past_key_values": _new_cache(model), "use_cache": True}
    return {**kwargs, "logits_to_keep": 1} if "logits_to_keep" in takes else kwargs


def _sampler(row: Row, device: torch.device) -> torch.Generator | None:
    if row.settings.temperature < GREEDY_BELOW:
        return None
    generator = torch.Generator(device)
    if row.settings.seed is None:
        generator.seed()
    else:
        generator.manual_seed(row.settings.seed)
    return generator


def _next_tokens(logits: torch.Tensor, live: list[_Answer], isolate: bool) -> list[int]:
    """Each row's next token: the argmax (one device sync for the batch), or a sample where it samples."""
    tokens = logits.argmax(-1).tolist()
    for i, a in enumerate(live):
        if a.sampler is not None:
            tokens[i] = a.guarded(isolate, _sample, logits[i], a.row.settings, a.sampler)
    return tokens


def _sample(logits: torch.Tensor, settings: Settings, generator: torch.Generator) -> int:
    logits = logits.float()
    # Scaled from the best logit down: at a small temperature a positive logit / temperature overflows to inf, and
    # inf - inf is NaN; from 0 down the worst is -inf, a probability of 0.
    probs = torch.softmax((logits - logits.max()) / settings.temperature, dim=-1)
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= settings.top_p  # the smallest set reaching top_p stays
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: Any, encoder: ChatEncoder, rows: Sequence[Row], isolate: bool = False) -> list[Completion]:
    """Answers to the rows, generated together (left-padded) and streamed through each row's `on_text`.
    Rows leave the batch as they finish; the model must already be in eval mode with the right adapter.
    With `isolate` (a server's requests), a row whose own part fails (its seed, its sampling, its callbacks)
    ends alone with finish_reason "error"; without, the exception ends the call. A failure of the model's
    forward pass ends the call either way."""
    device = next(model.parameters()).device
    context = context_length(model) or 1 << 62
    answers = [_Answer(r, encoder, generation_limit(r, context)) for r in rows]
    for a in answers:
        a.sampler = a.guarded(isolate, _sampler, a.row, device)
        if a.limit <= 0 and a.finish is None:
            a.finish = "length"
    live = [a for a in answers if a.finish is None]
    if not live:
        return [a.completion() for a in answers]
    ends = stop_ids(model, encoder)
    ids, mask, positions = _left_padded([a.row.prompt_ids for a in live], encoder.tokenizer.pad_token_id or 0, device)
    kwargs = _forward_kwargs(model)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    while True:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        tokens = _next_tokens(out.logits[:, -1, :], live, isolate)
        for a, token in zip(live, tokens, strict=True):
            if a.finish is None:  # not where its sampling failed
                a.guarded(isolate, a.take, token, ends)
        still = [i for i, a in enumerate(live) if a.finish is None]
        if not still:
            return [a.completion() for a in answers]
        if len(still) < len(live):  # finished rows leave the batch and its cache
            index = torch.tensor(still, device=device)
            cache.batch_select_indices(index)
            mask, positions = mask[index], positions[index]
            tokens, live = [tokens[i] for i in still], [live[i] for i in still]
        ids = torch.tensor(tokens, device=device).unsqueeze(-1)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=-1)
        positions = positions[:, -1:] + 1


def generation_limit(row: Row, context: int) -> int:
    """The most tokens `row` may generate: its max_new_tokens, or less where the context ends."""
    return min(row.settings.max_new_tokens, context - len(row.prompt_ids))


def _left_padded(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Input ids, attention mask and position ids of prompts padded on the left to one length: each row's
    positions count from its first real token, as they did for it alone."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    config = model.config
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers releases whose DynamicCache takes no config
        return DynamicCache()


def complete(
    model: Any,
    encoder: ChatEncoder,
    messages: Sequence[dict[str, Any]],
    settings: Settings,
    on_text: Callable[[str], None] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> Completion:
    """One answer to a conversation that may offer `tools`, streamed through `on_text`; its text keeps the call
    syntax's markers where they are special tokens."""
    ids = prompt_ids(encoder, messages, context_length(model), tools)
    keep = encoder.tool_marker_ids if tools else frozenset()
    return generate(model, encoder, [Row(ids, settings, on_text, keep_special=keep)])[0]
