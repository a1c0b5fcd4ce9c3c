"""Tool calls in served answers: how an answer is made to start when the request demands a call, how the calls are
read out of the finished answer, and how a streamed answer holds back what may be a call until it can tell.

The syntax (data/tools.py) is the template's: `<tool_call>{json}</tool_call>` or Phi-4-mini's
`<|tool_call|>[{json}]<|/tool_call|>`. Calls go out in OpenAI's shape, arguments as JSON text and a fresh id each.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from philora.data.render import ChatEncoder
from philora.data.tools import Syntax
from philora.infer.openai_api import ApiError, ChatRequest
from philora.infer.stops import partial_start


@dataclass(frozen=True)
class ToolUse:
    """How a request's answer is read for tool calls."""

    syntax: Syntax  # how the template writes calls
    prefill: str  # the text the answer is made to start with
    keep: frozenset[int]  # special tokens the answer's text keeps: the syntax's markers


def tool_use(encoder: ChatEncoder, chat: ChatRequest) -> ToolUse | None:
    """How to read the answer to `chat` for calls; None where it is not read for calls (no tools, or
    tool_choice "none"). 400 where the request has tools and the chat template cannot render them."""
    syntax = encoder.tool_syntax
    if not chat.tools:
        return None
    if syntax is None:
        message = "tools: this model's chat template cannot render tools; send the request without them"
        raise ApiError(400, message, param="tools")
    if chat.tool_choice == "none":
        return None
    return ToolUse(syntax, prefill(syntax, chat.tool_choice, chat.tool_name), encoder.tool_marker_ids)


def prefill(syntax: Syntax, choice: str, name: str | None) -> str:
    """The text the answer is made to start with: none for "auto", the opening marker for "required", and for a
    named function the opening of a call to it, up to its arguments (cut from the syntax's own writing of one)."""
    if choice == "required":
        return syntax.open
    if choice != "function":
        return ""
    written = syntax.write([{"function": {"name": name, "arguments": {}}}])
    return written[: written.index('"arguments": ') + len('"arguments": ')]


def read_answer(syntax: Syntax, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of a finished answer, calls in OpenAI's shape. Content is the text around the calls, None
    where there is none; text that is not all valid calls is all content."""
    content, calls = syntax.parse(text)
    if not calls:
        return text, []
    return content or None, [_wire(call) for call in calls]


def _wire(call: dict[str, Any]) -> dict[str, Any]:
    arguments = json.dumps(call["arguments"], ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": arguments},
    }


class CallStream:
    """A streamed answer's content, released as it grows except what may be a call: from the first place where
    the text could be the start of the opening marker on, it is held back (as StopText holds back a possible
    stop string), and so is trailing whitespace, which the finished content may not keep. `finish` reads the
    whole answer: its calls, and the content not yet released."""

    def __init__(self, syntax: Syntax, start: str = "") -> None:
        self.syntax = syntax
        self.text = start  # the answer so far, from its prefill on
        self.sent = 0  # characters of text released as content
        self.opened = False  # the opening marker was seen: the rest is held until the end

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.opened:
            return ""
        found = self.text.find(self.syntax.open, self.sent)
        self.opened = found >= 0
        end = found if self.opened else len(self.text) - partial_start(self.text, [self.syntax.open])
        end = self.sent + len(self.text[self.sent : end].rstrip())
        released, self.sent = self.text[self.sent : end], end
        return released

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content not yet released, calls in OpenAI's shape) of the whole answer."""
        content, calls = read_answer(self.syntax, self.text)
        if not calls:
            return self.text[self.sent :], []
        released = self.text[: self.sent].lstrip()  # the finished content is stripped: it starts the same way
        return (content or "")[len(released) :], calls
