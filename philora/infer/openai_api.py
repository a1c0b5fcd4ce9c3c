"""The OpenAI chat-completions wire format, as `philora serve` speaks it: parsing and validating the body of a
`/v1/chat/completions` request into a `ChatRequest` (every bad or unsupported field named in one 400), the
`ApiError` that is answered with OpenAI's error body, and the `usage` object of a response. No HTTP and no model
here: serve.py reads the bytes, queues the work and writes the replies.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from philora.infer.generation import ROLES, Completion, Settings

MAX_STOPS = 16
# Request fields philora does not implement, with the values that mean "not used"; anything else is refused.
UNSUPPORTED = dict(n=(None, 1), tools=(None, []), functions=(None, []), logprobs=(None, False), top_logprobs=(None, 0))
UNSUPPORTED |= dict(logit_bias=(None, {}), frequency_penalty=(None, 0), presence_penalty=(None, 0))
UNSUPPORTED |= dict(response_format=(None, {"type": "text"}))


@dataclass(eq=False)
class ApiError(Exception):
    """An HTTP error, answered with OpenAI's error body."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    settings: Settings
    stream: bool
    include_usage: bool


def parse_chat(raw: bytes, cap: int) -> ChatRequest:
    """The body of a /v1/chat/completions request, checked: ApiError 400 naming every bad field."""
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    problems: list[tuple[str, str]] = []

    def get(key: str, default: Any, ok: Callable[[Any], bool], want: str) -> Any:
        value = body.get(key)
        if value is not None and not ok(value):
            problems.append((key, f"{key}: {json.dumps(value)[:80]}; {want}"))
        return default if value is None or not ok(value) else value

    def number(low: float, high: float, low_open: bool = False) -> Callable[[Any], bool]:
        return lambda v: type(v) in (int, float) and (low < v if low_open else low <= v) and v <= high

    if not isinstance(body.get("model"), str) or not body["model"]:
        problems.append(("model", "model: give the name of a model (GET /v1/models lists them)"))
    messages = _messages(body.get("messages"), problems)
    tokens = number(1, float("inf"))
    limit = get("max_completion_tokens", None, tokens, "give a number of tokens >= 1")
    limit = limit or get("max_tokens", None, tokens, "give a number of tokens >= 1") or cap
    stop = get("stop", [], _stops, f"give a string or a list of at most {MAX_STOPS} non-empty strings")
    settings = Settings(
        max_new_tokens=min(int(limit), cap),
        temperature=get("temperature", 1.0, number(0, 2), "give a number from 0 to 2"),
        top_p=get("top_p", 1.0, number(0, 1, low_open=True), "give a number in (0, 1]"),
        seed=get("seed", None, lambda v: type(v) is int, "give an integer"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
    )
    stream = get("stream", False, lambda v: isinstance(v, bool), "give true or false")
    options = get("stream_options", {}, lambda v: isinstance(v, dict), 'give an object like {"include_usage": true}')
    for key, unused in UNSUPPORTED.items():
        if body.get(key) not in unused:
            problems.append((key, f"{key}: {json.dumps(body[key])[:80]}; philora serve does not support it"))
    if problems:
        raise ApiError(400, "; ".join(p for _, p in problems), param=problems[0][0])
    return ChatRequest(body["model"], messages, settings, stream, bool(options.get("include_usage")))


def _stops(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, list) and len(value) <= MAX_STOPS and all(isinstance(s, str) and s for s in value)


def _messages(value: Any, problems: list[tuple[str, str]]) -> list[dict[str, str]]:
    """The messages as {role, content} strings; the text parts of a content list are joined by newlines."""
    if not isinstance(value, list) or not value:
        problems.append(("messages", "messages: give a non-empty list of {role, content} objects"))
        return []
    result = []
    for i, m in enumerate(value):
        m = m if isinstance(m, dict) else {}
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "\n".join(str(p.get("text", "")) for p in content)
        if m.get("role") not in ROLES:
            problems.append((f"messages[{i}].role", f"messages[{i}].role: give one of {', '.join(ROLES)}"))
        elif not isinstance(content, str):
            problems.append((f"messages[{i}].content", f"messages[{i}].content: give text (a string or text parts)"))
        else:
            result.append({"role": m["role"], "content": content})
    return result


def usage(result: Completion) -> dict[str, int]:
    total = result.prompt_tokens + result.completion_tokens
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "total_tokens": total}
