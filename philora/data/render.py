"""Chat template rendering and loss masks, computed turn by turn.

The labels of assistant turn i are found from two renders of the conversation: the whole of it, and the
messages before turn i ending in the generation prompt (what the model sees before it answers). The second
must tokenize to an exact prefix of the first, token for token; the answer is what follows, through the first
end-of-turn token (`<|end|>` on Phi-3, `<|im_end|>` on SmolLM2). Template glue after that token (a newline, an
eos some templates append) is not the model's to say and is not trained. A template whose renders are not
prefixes of each other is reported, never silently mis-masked. Message text that contains a special token of
the tokenizer is refused: it would be read as a control token, and could end an answer early.

Tools (tools.py) are rendered where each template reads them (`tool_style`): templates that render `tools` and
`tool_calls` themselves get them as they are; Phi-4-mini's gets the schemas as JSON in its system message and the
calls written into the answer in its own syntax; a ChatML template without tools is given philora's
(CHATML_TOOLS), announced. Reasoning (`reasoning_content`, or a <think> block) goes to templates that read it, and
into the content as a <think> block for the others; a template that drops earlier answers' reasoning gets one
conversation per answer (`as_rendered`), each answer learned as the template shows it when it is written.

Renders are tokenized in batches through the fast tokenizer's Rust backend.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from philora import progress
from philora.data.formats import Conversation, RowProblem
from philora.data.templates import (
    CHATML_TOOLS,
    PHI3_TEMPLATE,
    PHI3_TOKENS,
    THINK_END,
    for_template,
    has_reasoning,
    tool_style,
)
from philora.data.tools import HERMES, PHI4, Syntax
from philora.errors import UserError

IGNORE = -100
MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content")  # what templates get


class NothingToTrain(RowProblem):
    """The row has no token that carries loss."""


class TemplateError(RowProblem):
    """The chat template cannot render this conversation, or its renders are not prefix-stable."""


@dataclass
class Sample:
    """One training sequence as int32 arrays: labels equal the ids where trained and IGNORE elsewhere."""

    input_ids: np.ndarray
    labels: np.ndarray
    turn_ends: list[int] = field(default_factory=list)  # token index after each trained answer

    @property
    def trained(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE))

    @classmethod
    def of(cls, ids: list[int], spans: list[tuple[int, int]] | None, turn_ends: list[int] | None = None) -> Sample:
        """Labels on the token spans given; None = every token (as a next-token target, so all but the first)."""
        array = np.array(ids, dtype=np.int32)
        labels = np.full_like(array, IGNORE)
        for start, stop in [(1, len(ids))] if spans is None else spans:
            labels[start:stop] = array[start:stop]
        return cls(array, labels, turn_ends or [])


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a Phi-3 tokenizer saved without a chat template the official one, and say so."""
    if getattr(tokenizer, "chat_template", None):
        return
    if all(t in tokenizer.get_vocab() for t in PHI3_TOKENS):
        tokenizer.chat_template = PHI3_TEMPLATE
        progress.say("the tokenizer has no chat template; using the official Phi-3 template")
        return
    raise UserError(
        f"the tokenizer of {tokenizer.name_or_path!r} has no chat template; use an instruct model's tokenizer "
        "(or one whose tokenizer_config.json has chat_template), or train on data.format: text"
    )


def trained_turns(messages: list[dict[str, Any]], train_on: str) -> list[int]:
    """Indices of the assistant messages whose tokens carry loss under `train_on` (assistant, last_assistant)."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True)]
    return turns[-1:] if train_on == "last_assistant" else turns


class ChatEncoder:
    """Turns conversations into token ids and labels with the tokenizer's own chat template."""

    def __init__(self, tokenizer: Any) -> None:
        ensure_chat_template(tokenizer)
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special
        }
        specials = sorted({tokenizer.convert_ids_to_tokens(i) for i in self.special_ids}, key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._special_id_of = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
        self._specials_map = dict(tokenizer.special_tokens_map)
        self._template = _compiled_template(tokenizer)
        self.tool_style = tool_style(tokenizer.get_chat_template())
        self._reads_reasoning = "reasoning_content" in (tokenizer.get_chat_template() or "")
        self.end_of_turn_id = self._find_end_of_turn()

    @property
    def tool_syntax(self) -> Syntax | None:
        """How this template writes tool calls in an answer; None where it cannot render tools."""
        return PHI4 if self.tool_style == "phi4" else HERMES if self.tool_style in ("chatml", "native-hermes") else None

    @property
    def tool_marker_ids(self) -> frozenset[int]:
        """The call syntax's markers that are special tokens of this tokenizer (Phi-4-mini's <|tool_call|> and
        <|/tool_call|>): generated text must keep them, or its calls cannot be read."""
        syntax = self.tool_syntax
        if syntax is None:
            return frozenset()
        return frozenset(
            {self.tokenizer.convert_tokens_to_ids(m) for m in (syntax.open, syntax.close)} & self.special_ids
        )

    def use_tools(self, say: bool = True) -> None:
        """Make the template able to render tools: a ChatML template without tools gets philora's, announced
        unless not `say` (it is saved with the tokenizer, so every later stage renders tools the same way).
        UserError where the template has no tools support and none can be given."""
        if self.tool_style == "chatml":
            self.tokenizer.chat_template = CHATML_TOOLS.replace("CHATML_OWN", self.tokenizer.get_chat_template())
            self._template = _compiled_template(self.tokenizer)
            self.tool_style = "native-hermes"
            if say:
                progress.say(
                    "the chat template has no tools support; philora's ChatML tools template renders "
                    "conversations with tools (schemas in <tools>, calls in <tool_call>, results in "
                    "<tool_response>); a trained adapter keeps it with its tokenizer"
                )
        if self.tool_style is None:
            raise UserError(
                f"the chat template of {self.tokenizer.name_or_path!r} cannot render tools (it never reads `tools` "
                "and `tool_calls`); use a model whose template does (Phi-4-mini, Qwen2.5, a ChatML model), or "
                "train on rows without tools"
            )

    def render(
        self, messages: list[dict[str, Any]], generation_prompt: bool = False, tools: list[dict[str, Any]] | None = None
    ) -> str:
        """The chat template's text. Messages are philora's checked ones (formats.py, tools.py), which need none
        of apply_chat_template's input conversion, so the compiled template renders them directly, with the same
        variables. Tools go where the template reads them (Phi-4-mini: the system message's `tools`)."""
        if self.tool_style in ("chatml", None) and (
            tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        ):
            raise TemplateError("this conversation has tools, and the chat template cannot render them yet")
        messages, tools = for_template(messages, tools, self.tool_style == "phi4", self._reads_reasoning)
        try:
            if self._template is None:
                return self.tokenizer.apply_chat_template(
                    messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
                )
            return self._template.render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=generation_prompt,
                **self._specials_map,
            )
        except Exception as e:  # jinja's TemplateError and raise_exception() from inside templates
            raise TemplateError(f"the chat template refused this conversation: {e}") from None

    def tokenize(self, texts: list[str], special: bool = False) -> list[list[int]]:
        """Token ids of many texts in one call (the Rust backend's batch path when there is one)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # encode_batch_fast skips character offsets, which are not needed here
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=special)]
        return self.tokenizer(texts, add_special_tokens=special)["input_ids"]

    def ids(
        self, messages: list[dict[str, Any]], generation_prompt: bool = False, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        return self.tokenize([self.render(messages, generation_prompt, tools)])[0]

    def _find_end_of_turn(self) -> int:
        """The special token the template puts right after an assistant message's content."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        prompt, full = self.ids(probe[:1], generation_prompt=True), self.ids(probe)
        for token in full[len(prompt) :]:
            # an unknown-word token is special too, but it stands for the answer's text, not for its end
            if token in self.special_ids and token != self.tokenizer.unk_token_id:
                return token
        return self.tokenizer.eos_token_id

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end generation: the end-of-turn token and eos."""
        return sorted({self.end_of_turn_id, self.tokenizer.eos_token_id} - {None})

    def encode(
        self,
        messages: list[dict[str, Any]],
        train_on: str = "assistant",
        tools: list[dict[str, Any]] | None = None,
        reasoning: bool = True,
    ) -> Sample:
        """Token ids and labels of one conversation; raises RowProblem."""
        result = self.encode_many([Conversation("", messages=messages, tools=tools)], train_on, reasoning)[0]
        if isinstance(result, RowProblem):
            raise result
        return result

    def encode_many(
        self, rows: list[Conversation], train_on: str = "assistant", reasoning: bool = True
    ) -> list[Sample | RowProblem]:
        """Samples of many rows, their renders tokenized in batches; a row that fails gets its RowProblem.
        `reasoning`: an answer's reasoning carries loss (else only what follows its </think>)."""
        plans: list[_Plan | RowProblem] = []
        for row in rows:
            try:
                plans.append(self._plan(row, train_on, reasoning))
            except RowProblem as e:
                plans.append(e)
        good = [p for p in plans if isinstance(p, _Plan)]
        for plan, ids in zip(good, self._tokenize_wholes(good), strict=True):
            plan.ids = ids
        cuts = [(plan, self._cut(plan, text)) for plan in good for text in plan.texts[1:] if plan.problem is None]
        tails = iter(self.tokenize([tail for _, (_, tail) in cuts]))
        for plan, (start, _tail) in cuts:
            prompt_tokens = next(tails)
            if plan.problem is None:
                self._add_answer(plan, start, prompt_tokens)
        results: list[Sample | RowProblem] = []
        for plan in plans:
            if isinstance(plan, RowProblem):
                results.append(plan)
            elif plan.problem is not None:
                results.append(plan.problem)
            else:
                results.append(plan.sample())
        return results

    def _tokenize_wholes(self, plans: list[_Plan]) -> list[list[int]]:
        chat = iter(self.tokenize([p.texts[0] for p in plans if not p.plain]))
        plain = iter(self.tokenize([p.texts[0] for p in plans if p.plain], special=True))
        eos = self.tokenizer.eos_token_id
        result = []
        for plan in plans:
            if not plan.plain:
                result.append(next(chat))
                continue
            ids = next(plain)
            result.append([*ids, eos] if eos is not None and (not ids or ids[-1] != eos) else ids)
        return result

    def _cut(self, plan: _Plan, prompt: str) -> tuple[int, str]:
        """Where the prompt render starts to need tokenizing: (token index in the whole, text from there on).

        Tokenizers split text at special tokens before anything else and tokenize the pieces independently, so
        a prompt that is a text prefix of the whole tokenizes like the whole up to its last special token; only
        the text from that token on is tokenized and compared (`_add_answer`), not the whole prompt again.
        """
        if not plan.texts[0].startswith(prompt):
            plan.problem = TemplateError(
                "the chat template is not prefix-stable: the render before an assistant message is not a prefix "
                "of the whole conversation, so its assistant tokens cannot be located exactly"
            )
            return 0, ""
        found = deque(self._special_text.finditer(prompt), maxlen=1) if self._special_text else ()
        if not found:
            return 0, prompt
        last = found[0]
        # The k-th time the template wrote this special token is the k-th time its id occurs in the whole.
        token, position = self._special_id_of[last.group()], -1
        try:
            for _ in range(prompt.count(last.group(), 0, last.start()) + 1):
                position = plan.ids.index(token, position + 1)
        except ValueError:
            return 0, prompt
        return position, prompt[last.start() :]

    def _add_answer(self, plan: _Plan, start: int, tail: list[int]) -> None:
        """Label the answer after the prompt that ends at start + len(tail) tokens, through its end-of-turn token."""
        ids, turn = plan.ids, plan.turns[len(plan.spans)]
        end_of_prompt = start + len(tail)
        if ids[start:end_of_prompt] != tail:
            prompt = self.ids(plan.messages[:turn], True, plan.tools)
            if ids[: len(prompt)] != prompt:
                opening = plan.messages[turn]["content"][:12]
                plan.problem = TemplateError(
                    f"messages[{turn}].content starts with {opening!r}, which the tokenizer merges with the end of the "
                    "chat template's prompt, so the answer does not start on a token boundary (training would "
                    "not match generation); remove the leading whitespace from that message"
                )
                return
            end_of_prompt = len(prompt)
        try:
            stop = self._answer_end(plan, turn, end_of_prompt)
        except TemplateError as e:
            plan.problem = e
            return
        if not plan.reasoning:
            end_of_prompt = self._after_reasoning(ids, end_of_prompt, stop)
        plan.spans.append((end_of_prompt, stop))

    def _after_reasoning(self, ids: list[int], start: int, stop: int) -> int:
        """The first token after the answer's </think> (found by bisection: "the decoded tokens so far hold
        </think>" only turns true once); `start` where it has none."""
        low, high = start, stop  # the shortest ids[start:k] holding </think> has k in (low, high]
        if THINK_END not in self.tokenizer.decode(ids[start:stop], skip_special_tokens=False):
            return start
        while high - low > 1:
            middle = (low + high) // 2
            if THINK_END in self.tokenizer.decode(ids[start:middle], skip_special_tokens=False):
                high = middle
            else:
                low = middle
        return high

    def as_rendered(self, row: Conversation, train_on: str) -> list[Conversation]:
        """The row as the conversations to encode: itself, or, where the template renders an earlier answer
        differently once later turns follow (templates that drop earlier turns' reasoning), one conversation per
        trained answer that ends with it, so that each answer is learned as the template renders it when the model
        writes it."""
        if row.messages is None or train_on == "all" or not any(has_reasoning(m) for m in row.messages):
            return [row]
        clean = self._clean(row.messages)
        whole = self.render(clean, tools=row.tools)
        end = self.tokenizer.convert_ids_to_tokens(self.end_of_turn_id)
        turns = trained_turns(row.messages, train_on)

        def kept(i: int) -> bool:  # the whole shows answer i through its end-of-turn as it was when written
            alone = self.render(clean[: i + 1], tools=row.tools)
            cut = alone.find(end, len(self.render(clean[:i], True, row.tools)))
            return whole.startswith(alone[: cut + len(end)] if cut >= 0 else alone)

        if all(kept(i) for i in turns):
            return [row]
        return [
            Conversation(
                row.source,
                messages=[
                    {**m, "train": j == i} if m["role"] == "assistant" else m
                    for j, m in enumerate(row.messages[: i + 1])
                ],
                tools=row.tools,
            )
            for i in turns
        ]

    @staticmethod
    def _clean(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages with philora's keys only (no `train`)."""
        return [{k: m[k] for k in MESSAGE_KEYS if k in m} for m in messages]

    def _plan(self, row: Conversation, train_on: str, reasoning: bool = True) -> _Plan:
        if row.text is not None:
            return _Plan([row.text], [], [], plain=True)
        assert row.messages is not None
        clean = self._clean(row.messages)
        self.refuse_special_text(row.messages, row.tools)
        whole = self.render(clean, tools=row.tools)
        if train_on == "all":
            return _Plan([whole], [], clean, row.tools)
        turns = trained_turns(row.messages, train_on)
        if not turns:
            raise NothingToTrain("nothing to train: every assistant message has train: false")
        prompts = [self.render(clean[:i], True, row.tools) for i in turns]
        return _Plan([whole, *prompts], turns, clean, row.tools, reasoning)

    def refuse_special_text(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> None:
        """RowProblem where a message's text, its calls or the tools hold a special token of this tokenizer."""
        if self._special_text is None:
            return
        texts = [("tools", json.dumps(tools, ensure_ascii=False))] if tools else []
        for i, m in enumerate(messages):
            texts += [(f"messages[{i}].content", m["content"])]
            if m.get("reasoning_content"):
                texts.append((f"messages[{i}].reasoning_content", m["reasoning_content"]))
            if m.get("tool_calls"):
                texts.append((f"messages[{i}].tool_calls", json.dumps(m["tool_calls"], ensure_ascii=False)))
        for place, text in texts:
            found = self._special_text.search(text)
            if found:
                raise RowProblem(
                    f"{place} contains {found.group()!r}, a special token of this tokenizer; the model would read "
                    "it as a control token (it can end an answer early): remove it from the text"
                )

    def _answer_end(self, plan: _Plan, i: int, start: int) -> int:
        ids = plan.ids
        try:
            return ids.index(self.end_of_turn_id, start) + 1
        except ValueError:
            pass
        # No end-of-turn token after the answer: the answer ends where rendering through it stops agreeing.
        upto = self.ids(plan.messages[: i + 1], tools=plan.tools)
        stop = start
        while stop < min(len(upto), len(ids)) and upto[stop] == ids[stop]:
            stop += 1
        if stop <= start:
            raise TemplateError(f"message {i}: the chat template renders this assistant message as no tokens")
        return stop


def _compiled_template(tokenizer: Any) -> Any:
    """transformers' own compiled (sandboxed, cached) template, or None where its API differs."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(tokenizer.get_chat_template())
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


@dataclass
class _Plan:
    """One row on its way to a sample: the renders it needs (the whole chat, then the prompt before each
    trained answer), then the whole chat's tokens and the answers found so far."""

    texts: list[str]
    turns: list[int]
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    reasoning: bool = True  # the answers' reasoning carries loss
    plain: bool = False  # the text format: every token trained
    ids: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # the trained answers' token spans
    problem: RowProblem | None = None

    def sample(self) -> Sample:
        if not self.turns:  # text, or train_on: all
            return Sample.of(self.ids, None)
        return Sample.of(self.ids, self.spans, [stop for _, stop in self.spans])
