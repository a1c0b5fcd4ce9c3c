"""The HTTP side of `philora serve`: a FastAPI app in front of the worker.

A request is validated by the pydantic models of openai_api.py (any error is OpenAI's 400 body, never FastAPI's
422), its prompt is tokenized off the event loop (in at most TOKENIZE_THREADS threads, with at most --max-queue
requests waiting for one: Gate), and its job is queued for the worker; the handler then awaits the job's events and
answers with JSON or streams server-sent events. A body over the size limit is refused with 413 before it is read
whole (BodyLimit). Tool calls are read out of answers by tool_calls.py. With a key, the API's description
(/docs, /redoc, /openapi.json) needs it too.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from philora import __version__
from philora.infer.generation import BadPrompt, Completion, Row, prompt_ids
from philora.infer.openai_api import (
    ApiError,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatRequest,
    Choice,
    ChunkChoice,
    Delta,
    FunctionDelta,
    ModelCard,
    ModelList,
    ToolCallDelta,
    chat_request,
    invalid_request,
    usage,
)
from philora.infer.tool_calls import CallStream, ToolUse, read_answer, tool_use
from philora.infer.worker import SHUTTING_DOWN, Job, Worker

DESCRIPTION = "OpenAI's chat completions, with tool calling, for a base model and its LoRA adapters."
POLL = 0.5  # seconds between checks that a waiting request's client is still there
# Prompts tokenized at once. Each holds its text's tokens (bounded by the context: generation._measured_ids), and
# the tokenizer is fast: two keep the worker fed without letting many large bodies be tokenized together.
TOKENIZE_THREADS = 2
T = TypeVar("T")
Bearer = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(HTTPBearer(auto_error=False, description="the server's --api-key, when it has one")),
]
router = APIRouter()


class Api:
    """What every request shares: the served model names, the key, the worker, the shutdown state."""

    def __init__(self, base: str, adapters: list[str], worker: Worker, key: str | None, max_new_tokens: int) -> None:
        self.models: dict[str, str | None] = {base: None, **{a: a for a in adapters}}
        self.base, self.worker, self.key, self.max_new_tokens = base, worker, key, max_new_tokens
        self.context = getattr(worker.model.config, "max_position_embeddings", None)
        self.gate = Gate(TOKENIZE_THREADS, worker.max_queue)
        self.closing = False

    def resolve(self, name: str) -> str:
        """The served name a request's `model` means ("base" is the base model); 404 if none."""
        if name == "base" and name not in self.models:
            return self.base
        if name not in self.models:
            message = f"The model '{name}' does not exist; this server has: {', '.join(self.models)}"
            raise ApiError(404, message, param="model", code="model_not_found")
        return name

    def authorized(self, credentials: HTTPAuthorizationCredentials | None) -> bool:
        if self.key is None:
            return True
        token = credentials.credentials.strip() if credentials is not None else ""
        return hmac.compare_digest(token.encode(), self.key.encode())

    def model_card(self, name: str) -> ModelCard:
        return ModelCard(id=name, parent=self.base if self.models[name] else None)


def busy(what: str) -> ApiError:
    message = f"the server is busy: {what}; retry later"
    return ApiError(503, message, "server_error", code="overloaded", headers={"Retry-After": "1"})


class Gate:
    """Runs a request's preparation (its prompt tokenized) in a thread, at most `threads` at once, with at most
    `waiting` more requests waiting for a turn; one more is refused 503 at once. Starlette's shared pool would run
    40 at once."""

    def __init__(self, threads: int, waiting: int) -> None:
        self.turns = asyncio.Semaphore(threads)  # bound to the server's loop when first awaited
        self.room = threads + waiting
        self.inside = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.inside >= self.room:
            raise busy("too many requests are waiting to be tokenized")
        self.inside += 1
        try:
            async with self.turns:
                return await run_in_threadpool(fn, *args)
        finally:
            self.inside -= 1


def build_app(api: Api, max_body: int) -> FastAPI:
    """The app for `api`: the routes, OpenAI's error bodies for every error, the body size limit."""
    # The description is served by routes of its own (openapi, docs, redoc), behind the key when there is one.
    app = FastAPI(title="philora serve", version=__version__, description=DESCRIPTION, openapi_url=None)
    app.state.api = api
    app.include_router(router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(BodyLimit, limit=max_body)
    return app


class BodyLimit:
    """Refuses a request body over `limit` bytes with 413 before it is read whole: at once when its Content-Length
    says so, or, for a body sent in chunks, as soon as the bytes that have arrived pass the limit. The connection
    stays open and uvicorn drops the rest of the body as it comes, unread: a client still sending gets the answer,
    where closing at once would reset the connection under it and lose the 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await _api_error_response(self._too_large())(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self._too_large()  # an HTTPException: FastAPI lets it through from the body's reading
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> ApiError:
        message = f"the request body is over the server's limit of {self.limit} bytes (--max-body-mb); send less"
        return ApiError(413, message, code="request_too_large")


def _api_error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), error.status_code, headers=error.headers)


async def _api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)
    return _api_error_response(error)


async def _http_error(request: Request, error: Exception) -> Response:
    """Starlette's own errors (no such route, a body that cannot be read) in OpenAI's shape."""
    assert isinstance(error, HTTPException)
    if error.status_code in (404, 405):
        message = f"no such endpoint: {request.method} {request.url.path}"
        return _api_error_response(ApiError(error.status_code, message, code="unknown_url"))
    return _api_error_response(ApiError(error.status_code, str(error.detail), headers=error.headers))


async def _validation_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    return _api_error_response(invalid_request(error.errors()))


async def authorized(request: Request, credentials: Bearer) -> Api:
    """The server's Api, once the request's key is right (401 if not)."""
    api: Api = request.app.state.api
    if not api.authorized(credentials):
        raise ApiError(401, "Incorrect API key provided; send `Authorization: Bearer KEY`", code="invalid_api_key")
    return api


Authorized = Annotated[Api, Depends(authorized)]


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while serving; 503 once shutting down."""
    closing = request.app.state.api.closing
    return JSONResponse({"status": "shutting down" if closing else "ok"}, 503 if closing else 200)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, api: Authorized) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def docs(api: Authorized) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="philora serve")


@router.get("/redoc", include_in_schema=False)
async def redoc(api: Authorized) -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title="philora serve")


@router.get("/v1/models")
async def models(api: Authorized) -> ModelList:
    return ModelList(data=[api.model_card(m) for m in api.models])


@router.get("/v1/models/{name:path}")
async def model(name: str, api: Authorized) -> ModelCard:
    return api.model_card(api.resolve(name))


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events with `stream: true`"}},
)
async def chat_completions(body: ChatCompletionRequest, request: Request, api: Authorized) -> Any:
    """A chat completion, as JSON or (`stream: true`) as server-sent events of ChatCompletionChunk."""
    if api.closing:
        raise SHUTTING_DOWN
    chat, job, tools = await api.gate.run(_prepare, api, body, asyncio.get_running_loop())
    if not api.worker.submit(job):
        raise busy("its queue of requests is full")
    if chat.stream:
        events = _stream(job, chat, tools, request)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _reply(job, chat, tools, request)


def _prepare(
    api: Api, body: ChatCompletionRequest, loop: asyncio.AbstractEventLoop
) -> tuple[ChatRequest, Job, ToolUse | None]:
    """The request checked and its prompt tokenized, as a job for the worker (in a thread: tokenizing a long
    prompt would hold up the event loop)."""
    chat = chat_request(body, api.max_new_tokens)
    adapter = api.models[api.resolve(chat.model)]
    tools = tool_use(api.worker.encoder, chat)
    prefill = tools.prefill if tools is not None else ""
    try:
        ids = prompt_ids(api.worker.encoder, chat.messages, api.context, chat.tools, prefill)
    except BadPrompt as e:
        raise ApiError(400, str(e), param="messages") from None
    keep = tools.keep if tools is not None else frozenset()
    row = Row(ids, chat.settings, keep_special=keep)
    _check_span(api.worker, row)
    return chat, Job(adapter, row, loop), tools


def _check_span(worker: Worker, row: Row) -> None:
    """400 where the row alone is over a batch's token budget: it could never be generated."""
    span, budget = worker.span(row), worker.batch_tokens
    if span > budget:
        message = (
            f"the prompt ({len(row.prompt_ids)} tokens) and max_tokens ({span - len(row.prompt_ids)}) come to "
            f"{span} tokens, over this server's --max-batch-tokens {budget}; send a shorter prompt or fewer max_tokens"
        )
        raise ApiError(400, message, param="max_tokens" if len(row.prompt_ids) < budget else "messages")


async def _events(job: Job, request: Request) -> AsyncIterator[tuple[str, Any]]:
    """The job's events until it is done. A client that hangs up cancels its job, and the events stop."""
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), timeout=POLL)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                return
            continue
        yield kind, value
        if kind != "text":
            return


def _outcome(kind: str, value: Any) -> Completion:
    """The finished answer; the error to answer with instead when there is none."""
    if kind == "error":
        raise value
    if value.finish_reason == "cancelled":
        raise SHUTTING_DOWN
    return value


async def _reply(job: Job, chat: ChatRequest, tools: ToolUse | None, request: Request) -> Any:
    events = [event async for event in _events(job, request)]
    if not events or events[-1][0] == "text":
        return Response(status_code=499)  # the client left: nobody reads this
    result = _outcome(*events[-1])
    content, calls = read_answer(tools.syntax, tools.prefill + result.text) if tools else (result.text, [])
    message = AssistantMessage(content=content, tool_calls=calls or None)
    finish = "tool_calls" if calls else result.finish_reason
    choice = Choice(message=message, finish_reason=finish)
    return ChatCompletion(id=_id(), created=int(time.time()), model=chat.model, choices=[choice], usage=usage(result))


async def _stream(job: Job, chat: ChatRequest, tools: ToolUse | None, request: Request) -> AsyncIterator[str]:
    """The answer as server-sent events: a first chunk with the role, then content deltas, then the end."""
    head = {"id": _id(), "created": int(time.time()), "model": chat.model}
    calls_text = CallStream(tools.syntax, tools.prefill) if tools else None
    try:
        yield _chunk(head, Delta(role="assistant", content=""))
        async for kind, value in _events(job, request):
            if kind != "text":
                for event in _ending(kind, value, calls_text, chat, head):
                    yield event
                continue
            text = calls_text.feed(value) if calls_text else value
            if text:
                yield _chunk(head, Delta(content=text))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # the client may have left mid-stream; a finished job ignores it


def _ending(kind: str, value: Any, calls_text: CallStream | None, chat: ChatRequest, head: dict[str, Any]) -> list[str]:
    """The last events of a stream: the content held back, the calls (each a chunk with its id and name, then one
    with its arguments, as OpenAI streams them), the finish reason and the usage if asked; or the error."""
    try:
        result = _outcome(kind, value)
    except ApiError as e:
        return [f"data: {json.dumps(e.body())}\n\n"]
    rest, calls = calls_text.finish() if calls_text else ("", [])
    events = [_chunk(head, Delta(content=rest))] if rest else []
    for k, call in enumerate(calls):
        named = FunctionDelta(name=call["function"]["name"], arguments="")
        events.append(
            _chunk(head, Delta(tool_calls=[ToolCallDelta(index=k, id=call["id"], type="function", function=named)]))
        )
        arguments = FunctionDelta(arguments=call["function"]["arguments"])
        events.append(_chunk(head, Delta(tool_calls=[ToolCallDelta(index=k, function=arguments)])))
    events.append(_chunk(head, Delta(), "tool_calls" if calls else result.finish_reason))
    if chat.include_usage:
        events.append(_sse(ChatCompletionChunk(**head, choices=[], usage=usage(result))))
    return events


def _chunk(head: dict[str, Any], delta: Delta, finish: str | None = None) -> str:
    return _sse(ChatCompletionChunk(**head, choices=[ChunkChoice(delta=delta, finish_reason=finish)]))


def _sse(chunk: ChatCompletionChunk) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def _id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
