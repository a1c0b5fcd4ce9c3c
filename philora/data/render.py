"""Chat template rendering and loss masks, computed turn by turn.

The labels of an assistant turn are found by rendering the conversation up to that turn twice — once ending
in the generation prompt (what the model sees before it answers), once including the answer — and taking the
tokens in between, through the end-of-turn token (`<|end|>` on Phi-3, `<|im_end|>` on SmolLM2). Template glue
after that token (a newline, an eos some templates append) is not the model's to say and is not trained.
Every prefix is checked token for token; a template whose renders are not prefixes of each other is reported,
never silently mis-masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from philora.errors import UserError

IGNORE = -100


class TemplateError(ValueError):
    """The chat template cannot render this conversation, or its renders are not prefix-stable."""


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


class ChatEncoder:
    """Turns conversations into token ids and labels with the tokenizer's own chat template."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"the tokenizer of {tokenizer.name_or_path!r} has no chat template; use an instruct model's "
                "tokenizer (or one whose tokenizer_config.json has chat_template)"
            )
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special
        }
        self.end_of_turn_id = self._find_end_of_turn()

    def ids(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja's TemplateError and raise_exception() from inside templates
            raise TemplateError(f"the chat template refused this conversation: {e}") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _find_end_of_turn(self) -> int:
        """The special token the template puts right after an assistant message's content."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        prompt, full = self.ids(probe[:1], generation_prompt=True), self.ids(probe)
        for token in full[len(prompt) :]:
            if token in self.special_ids:
                return token
        return self.tokenizer.eos_token_id

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end generation: the end-of-turn token and eos."""
        return sorted({self.end_of_turn_id, self.tokenizer.eos_token_id} - {None})

    def encode(self, messages: list[dict[str, Any]], train_on: str = "assistant") -> Sample:
        """Token ids and labels; labels are IGNORE except on the trained tokens."""
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        ids = self.ids(clean)
        if train_on == "all":
            return Sample(ids, [IGNORE, *ids[1:]])
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True)]
        if train_on == "last_assistant":
            turns = turns[-1:]
        labels = [IGNORE] * len(ids)
        for i in turns:
            start, stop = self._answer_span(clean, i, ids)
            labels[start:stop] = ids[start:stop]
        return Sample(ids, labels)

    def _answer_span(self, messages: list[dict[str, Any]], i: int, ids: list[int]) -> tuple[int, int]:
        prompt = self.ids(messages[:i], generation_prompt=True)
        if ids[: len(prompt)] != prompt:
            raise TemplateError(
                f"the chat template is not prefix-stable: rendering up to message {i} is not a prefix of the "
                "whole conversation, so its assistant tokens cannot be located exactly"
            )
        upto = self.ids(messages[: i + 1])
        stop = len(prompt)
        while stop < min(len(upto), len(ids)) and upto[stop] == ids[stop]:
            stop += 1  # the common prefix: templates may close the last turn differently (e.g. with an eos)
        if self.end_of_turn_id in ids[len(prompt) : stop]:
            stop = ids.index(self.end_of_turn_id, len(prompt)) + 1
        if stop <= len(prompt):
            raise TemplateError(f"message {i}: the chat template renders this assistant message as no tokens")
        return len(prompt), stop
