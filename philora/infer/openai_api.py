"""The OpenAI chat-completions wire format, as `philora serve` speaks it: pydantic models of the request and of the
responses (FastAPI validates with them and publishes them at /docs), the `ApiError` answered with OpenAI's error
body, and `chat_request`, which turns a validated request into philora's messages, tools and settings. A request
that does not fit is one 400 naming every bad field (`invalid_request` turns pydantic's errors into it). No model
here: app.py queues the work and writes the replies.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WrapValidator, field_serializer
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from philora.data.tools import BadTools, check_calls, check_results, check_tools
from philora.infer.generation import SEEDS, Completion, Settings

MAX_STOPS = 16
# Characters in one stop string. Stop strings are markers ("\n\n", "Observation:", "</answer>"), tens of characters
# at most; 256 leaves room, and bounds what a streamed answer holds back while its end may become one.
MAX_STOP_CHARS = 256


class ApiError(HTTPException):
    """An HTTP error, answered with OpenAI's error body. An HTTPException, so that FastAPI passes it on unchanged
    when it comes from reading the body (the size limit)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, headers)
        self.type, self.param, self.code = type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.detail, "type": self.type, "param": self.param, "code": self.code}}


def one_error(fix: str) -> WrapValidator:
    """A field whose every failure is one error saying `fix` (not one per member of its union type)."""

    def check(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid", fix) from None

    return WrapValidator(check)


def unused(*values: Any) -> AfterValidator:
    """A field philora does not implement: accepted only with a value that means "not used"."""

    def check(value: Any) -> Any:
        if value not in values:
            raise PydanticCustomError("unsupported", "philora serve does not support it")
        return value

    return AfterValidator(check)


class Strict(BaseModel):
    """No silent conversions: "0.5" is not a number and 1 is not true, as in OpenAI's API."""

    model_config = ConfigDict(strict=True)


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class CalledFunction(Strict):
    name: str
    arguments: Annotated[str | dict[str, Any], one_error("give the arguments as JSON text or an object")]


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[TextPart] | None, one_error("give text: a string or a list of text parts")] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's calls, as this API returned them")
    tool_call_id: str | None = Field(None, description="a tool result: the id of the call it answers")


class FunctionSchema(Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments")


class Tool(Strict):
    type: Literal["function"] = "function"
    function: FunctionSchema


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"] = "function"
    function: FunctionName


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(Strict):
    """The body of POST /v1/chat/completions. As in OpenAI's API, temperature defaults to 1; below 1e-5 it is
    greedy (generation.GREEDY_BELOW)."""

    model: str = Field(min_length=1, description="a served name (GET /v1/models lists them)")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="capped by the server's --max-new-tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=SEEDS[0], le=SEEDS[1], description="a 64-bit integer")
    stop: Annotated[
        StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None,
        one_error(f"give a string or a list of at most {MAX_STOPS} strings, each of 1 to {MAX_STOP_CHARS} characters"),
    ] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Annotated[
        Literal["none", "auto", "required"] | NamedToolChoice | None,
        one_error('give "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'),
    ] = None
    n: Annotated[Any, unused(None, 1)] = None
    functions: Annotated[Any, unused(None, [])] = None
    logprobs: Annotated[Any, unused(None, False)] = None
    top_logprobs: Annotated[Any, unused(None, 0)] = None
    logit_bias: Annotated[Any, unused(None, {})] = None
    frequency_penalty: Annotated[Any, unused(None, 0)] = None
    presence_penalty: Annotated[Any, unused(None, 0)] = None
    response_format: Annotated[Any, unused(None, {"type": "text"})] = None


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="JSON text")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None

    @field_serializer("delta")
    def _only_what_changed(self, delta: Delta) -> dict[str, Any]:
        """A delta carries only the fields it sets, as OpenAI sends them."""
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "philora"
    parent: str | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@dataclass
class ChatRequest:
    """A request in philora's terms."""

    model: str
    messages: list[dict[str, Any]]  # {role, content} and, with tools, tool_calls or tool_call_id and name
    settings: Settings
    stream: bool
    include_usage: bool
    tools: list[dict[str, Any]] | None  # the tools the prompt shows, in check_tools's shape
    tool_choice: str  # "none", "auto", "required", or "function": call `tool_name`
    tool_name: str | None = None


def chat_request(body: ChatCompletionRequest, cap: int) -> ChatRequest:
    """The request with its messages and tools checked together: ApiError 400 naming what does not fit."""
    tools = _tools(body.tools)
    choice, name = _tool_choice(body.tool_choice, tools)
    limit = body.max_completion_tokens or body.max_tokens or cap
    stop = body.stop or []
    settings = Settings(
        max_new_tokens=min(limit, cap),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
    )
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    messages = _messages(body.messages, tools or [])
    if choice == "none" and not any("tool_calls" in m for m in messages):
        tools = None  # the model is not to call them; the template needs them only to show calls already made
    return ChatRequest(body.model, messages, settings, body.stream, include_usage, tools, choice, name)


def _tools(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    try:
        return check_tools([t.model_dump(exclude_none=True) for t in tools], "tools")
    except BadTools as e:
        raise ApiError(400, str(e), param="tools") from None


def _tool_choice(choice: str | NamedToolChoice | None, tools: list[dict[str, Any]] | None) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "function", the function's name): "auto" where tools are given."""
    if choice is None:
        return ("auto" if tools else "none"), None
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if choice in ("none", "auto"):
        return choice, None
    offered = [t["function"]["name"] for t in tools or []]
    if not offered:
        raise ApiError(400, f"tool_choice: {_shown(choice)} needs tools; give tools", param="tool_choice")
    if named is not None and named not in offered:
        message = f"tool_choice: function {named!r} is not one of the tools ({', '.join(offered)}); name one of them"
        raise ApiError(400, message, param="tool_choice")
    return ("function", named) if named is not None else ("required", None)


def _messages(messages: list[Message], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as philora's: text parts joined by newlines, assistant calls and tool results checked against
    the tools and each other; one ApiError naming every message that does not fit."""
    result, problems = [], []
    for i, m in enumerate(messages):
        place = f"messages[{i}]"
        content = "\n".join(p.text for p in m.content) if isinstance(m.content, list) else m.content
        message: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.tool_calls and m.role != "assistant":
            problems.append((f"{place}.tool_calls", f"{place}.tool_calls: only an assistant message makes calls"))
        elif m.tool_calls:
            calls = [c.model_dump(exclude_none=True) for c in m.tool_calls]
            try:
                message["tool_calls"] = check_calls(calls, f"{place}.tool_calls", tools, turn=i)
            except BadTools as e:
                problems.append((f"{place}.tool_calls", str(e)))
        elif content is None:
            problems.append((f"{place}.content", f"{place}.content: give text (a string or text parts)"))
        if m.role == "tool":
            message |= {k: v for k, v in (("tool_call_id", m.tool_call_id), ("name", m.name)) if v is not None}
        result.append(message)
    if not problems:
        try:
            check_results(result, "messages")
        except BadTools as e:
            problems.append(("messages", str(e)))
    if problems:
        raise ApiError(400, "; ".join(p for _, p in problems), param=problems[0][0])
    return result


def invalid_request(errors: Sequence[Any]) -> ApiError:
    """FastAPI's validation errors of a request body as one OpenAI 400 naming every bad field."""
    problems = []
    for error in errors:
        loc = [part for part in error["loc"] if part != "body"]
        if error["type"] == "json_invalid":
            return ApiError(400, f"the request body is not valid JSON: {error['ctx']['error']}")
        if not loc:
            if isinstance(error.get("input"), bytes):
                return ApiError(400, "send the request body as JSON, with `Content-Type: application/json`")
            return ApiError(400, "the request body must be a JSON object")
        place = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        value = "missing" if error["type"] == "missing" else _shown(error.get("input"))
        problems.append((place, f"{place}: {value}; {error['msg']}"))
    return ApiError(400, "; ".join(p for _, p in problems), param=problems[0][0])


def _shown(value: Any) -> str:
    """A value as JSON, cut short: what a message quotes of what the client sent."""
    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_none=True)
    return json.dumps(value, ensure_ascii=False, default=str)[:80]


def usage(result: Completion) -> Usage:
    total = result.prompt_tokens + result.completion_tokens
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens, total_tokens=total)
