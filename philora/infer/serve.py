"""`philora serve`: an OpenAI-compatible HTTP server for the base model and any number of adapters.

Endpoints: `POST /v1/chat/completions` (JSON, or Server-Sent Events with `stream: true`), `GET /v1/models`,
`GET /v1/models/{id}`, `GET /health`. The request's `model` picks an adapter by name, or the base model by its
own name (or `base`). As in OpenAI's API, `temperature` defaults to 1; send 0 for greedy answers.

One model on one device: a single worker thread owns it. HTTP threads check a request, tokenize its prompt and
put it on a bounded queue; a full queue is answered 503 at once. The worker takes the oldest request and the
other waiting ones for the same adapter and generates them as one left-padded batch. Only the worker touches the
model, so switching adapters can never change a request that is generating. SIGTERM or SIGINT: stop accepting,
answer the requests already accepted, exit 0; a second signal cancels those.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from philora.data.render import ChatEncoder
from philora.errors import UserError
from philora.infer.adapters import Adapter, read_adapter
from philora.infer.generation import BadPrompt, Row, generate, prompt_ids
from philora.infer.openai_api import ApiError, ChatRequest, parse_chat, usage

MAX_BATCH = 16  # requests generated together
MAX_BODY = 16 << 20

SHUTTING_DOWN = ApiError(503, "the server is shutting down", "server_error")


@dataclass
class Job:
    """One chat completion on its way through the worker, which reports to `events`:
    ("text", str) as the answer grows, then ("done", Completion) or ("error", ApiError)."""

    adapter: str | None  # None: the base model
    row: Row
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.row.on_text = lambda text: self.events.put(("text", text))
        self.row.cancelled = self.cancel.is_set


class Worker:
    """The only thread that touches the model: takes batches of jobs for one adapter and generates them."""

    def __init__(self, model: Any, encoder: ChatEncoder, max_queue: int) -> None:
        self.model, self.encoder, self.max_queue = model, encoder, max_queue
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="philora-generate", daemon=True)

    def submit(self, job: Job) -> bool:
        """Queue the job; False when the queue is full or the server is closing."""
        with self.cond:
            if self.closed or len(self.waiting) >= self.max_queue:
                return False
            self.waiting.append(job)
            self.cond.notify()
            return True

    def close(self) -> None:
        """Take no new jobs; return once the queued and running ones are answered."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()

    def cancel(self) -> None:
        """Answer the queued jobs 503 and stop the running ones where they are."""
        with self.cond:
            dropped = list(self.waiting)
            self.waiting.clear()
        for job in dropped:
            job.events.put(("error", SHUTTING_DOWN))
        for job in list(self.running):
            job.cancel.set()

    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.waiting and not self.closed:
                self.cond.wait()
            if not self.waiting:
                return None
            first = self.waiting.popleft()
            batch = [first, *[j for j in self.waiting if j.adapter == first.adapter][: MAX_BATCH - 1]]
            for job in batch[1:]:
                self.waiting.remove(job)
            self.running = [j for j in batch if not j.cancel.is_set()]  # the others' clients left
            return self.running

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                if batch:
                    with self._adapter(batch[0].adapter):
                        results = generate(self.model, self.encoder, [j.row for j in batch])
                    for job, result in zip(batch, results, strict=True):
                        job.events.put(("done", result))
            except Exception:  # a bug: tell these requests, keep serving the others
                traceback.print_exc()
                for job in batch:
                    job.events.put(("error", ApiError(500, "generation failed; see the server log", "server_error")))
            finally:
                self.running = []

    def _adapter(self, name: str | None) -> AbstractContextManager[Any]:
        if not hasattr(self.model, "disable_adapter"):  # a plain model: no adapters loaded
            return nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return nullcontext()


class Api:
    """What every request handler shares: the model names, the key, the worker, the shutdown state."""

    def __init__(self, base: str, adapters: list[str], worker: Worker, key: str | None, max_new_tokens: int) -> None:
        self.models: dict[str, str | None] = {base: None, **{a: a for a in adapters}}
        self.base, self.worker, self.key, self.max_new_tokens = base, worker, key, max_new_tokens
        self.context = getattr(worker.model.config, "max_position_embeddings", None)
        self.closing = False
        self.active = 0  # requests being handled
        self.idle = threading.Condition()

    def resolve(self, name: str) -> str:
        """The served name a request's `model` means ("base" is the base model); 404 if none."""
        if name == "base" and name not in self.models:
            return self.base
        if name not in self.models:
            message = f"The model '{name}' does not exist; this server has: {', '.join(self.models)}"
            raise ApiError(404, message, param="model", code="model_not_found")
        return name

    def authorized(self, header: str | None) -> bool:
        if self.key is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key.encode())

    def model_card(self, name: str) -> dict[str, Any]:
        parent = self.base if self.models[name] else None
        return {"id": name, "object": "model", "created": 0, "owned_by": "philora", "parent": parent}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "philora"
    api: Api  # set on the subclass made for each server

    def do_GET(self) -> None:
        self._handle(self._get)

    def do_POST(self) -> None:
        self._handle(self._post)

    def _handle(self, route: Callable[[str], None]) -> None:
        with self.api.idle:
            self.api.active += 1
        try:
            route(self.path.split("?", 1)[0].rstrip("/"))
        except ApiError as e:
            self._send_json(e.status, e.body(), e.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with self.api.idle:
                self.api.active -= 1
                self.api.idle.notify_all()

    def _get(self, path: str) -> None:
        if path == "/health":
            closing = self.api.closing
            self._send_json(503 if closing else 200, {"status": "shutting down" if closing else "ok"})
            return
        self._check_key()
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [self.api.model_card(m) for m in self.api.models]})
        elif path.startswith("/v1/models/"):
            self._send_json(200, self.api.model_card(self.api.resolve(path.removeprefix("/v1/models/"))))
        else:
            raise ApiError(404, f"no such endpoint: GET {path}", code="unknown_url")

    def _post(self, path: str) -> None:
        body = self._read_body()
        if path != "/v1/chat/completions":
            raise ApiError(404, f"no such endpoint: POST {path}", code="unknown_url")
        self._check_key()
        if self.api.closing:
            raise SHUTTING_DOWN
        request = parse_chat(body, self.api.max_new_tokens)
        adapter = self.api.models[self.api.resolve(request.model)]
        try:
            ids = prompt_ids(self.api.worker.encoder, request.messages, self.api.context)
        except BadPrompt as e:
            raise ApiError(400, str(e), param="messages") from None
        job = Job(adapter, Row(ids, request.settings))
        if not self.api.worker.submit(job):
            message = "the server is busy: its queue of requests is full; retry later"
            raise ApiError(503, message, "server_error", code="overloaded", headers={"Retry-After": "1"})
        (self._stream if request.stream else self._reply)(job, request)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY:
            self.close_connection = True  # the body, if any, is not read: the connection cannot be reused
            status, want = (413, f"at most {MAX_BODY} bytes") if length.isdigit() else (411, "a Content-Length")
            raise ApiError(status, f"send the request body with {want}")
        return self.rfile.read(int(length))

    def _check_key(self) -> None:
        if not self.api.authorized(self.headers.get("Authorization")):
            raise ApiError(401, "Incorrect API key provided; send `Authorization: Bearer KEY`", code="invalid_api_key")

    def _events(self, job: Job) -> Iterator[tuple[str, Any]]:
        """The job's events until it is done. A client that hangs up cancels its job."""
        while True:
            try:
                kind, value = job.events.get(timeout=0.5)
            except queue.Empty:
                if self._client_gone():
                    job.cancel.set()
                    raise ConnectionResetError from None
                continue
            yield kind, value
            if kind != "text":
                return

    def _reply(self, job: Job, request: ChatRequest) -> None:
        kind, result = list(self._events(job))[-1]
        if kind == "error" or result.finish_reason == "cancelled":
            raise result if kind == "error" else SHUTTING_DOWN
        message = {"role": "assistant", "content": result.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}
        head = {"id": _id(), "object": "chat.completion", "created": int(time.time()), "model": request.model}
        self._send_json(200, {**head, "choices": [choice], "usage": usage(result)})

    def _stream(self, job: Job, request: ChatRequest) -> None:
        self.send_response(200)
        self._headers(
            {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Transfer-Encoding": "chunked"}
        )
        head = {"id": _id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": request.model}

        def send(delta: dict[str, str], finish: str | None = None) -> None:
            self._event({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        try:
            send({"role": "assistant", "content": ""})
            for kind, value in self._events(job):
                if kind == "text":
                    send({"content": value})
                elif kind == "error" or value.finish_reason == "cancelled":
                    self._event((value if kind == "error" else SHUTTING_DOWN).body())
                else:
                    send({}, value.finish_reason)
                    if request.include_usage:
                        self._event({**head, "choices": [], "usage": usage(value)})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            job.cancel.set()
            self.close_connection = True

    def _event(self, obj: dict[str, Any]) -> None:
        self._chunk(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        """One piece of a chunked (HTTP/1.1) body; an empty one ends it."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _send_json(self, status: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self._headers({"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})})
        self.wfile.write(body)

    def _headers(self, headers: dict[str, str]) -> None:
        if self.api.closing or self.close_connection:
            self.close_connection = True
            headers = {**headers, "Connection": "close"}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _client_gone(self) -> bool:
        """True when the client has closed its end: the socket reads as ready with nothing in it."""
        try:
            readable = select.select([self.connection], [], [], 0)[0]
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"philora: {self.address_string()} {format % args}\n")


def _id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def main(args: argparse.Namespace) -> int:
    from philora.infer.adapters import load

    problems = [f"--max-queue: {args.max_queue}; give a number >= 1"] if args.max_queue < 1 else []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens: {args.max_new_tokens}; give a number of tokens >= 1")
    if not 0 <= args.port < 65536:
        problems.append(f"--port: {args.port}; give a port from 0 (any free one) to 65535")
    if problems:
        raise UserError(*problems)
    adapters = adapters_of(args.adapters)
    base = base_name(args.model, adapters)
    if base in {a.name for a in adapters}:
        raise UserError(f"--adapter {base}=...: the base model is served under that name; name the adapter otherwise")
    server = bind(args.host, args.port)  # before the model loads: a port in use fails at once
    model, tokenizer = load(adapters, args.model, args.dtype)
    key = args.api_key or os.environ.get("PHILORA_API_KEY") or None
    worker = Worker(model, ChatEncoder(tokenizer), args.max_queue)
    api = Api(base, [a.name for a in adapters], worker, key, args.max_new_tokens)
    server.RequestHandlerClass.api = api
    return serve(server, api)


def adapters_of(specs: list[str]) -> list[Adapter]:
    """`NAME=DIR`, or a bare `DIR` named after its run dir (or after itself, outside a run), per --adapter."""
    adapters = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            name, path = "", spec
        adapter = read_adapter(path, name or "default")
        if not name:
            adapter.name = (adapter.path.parent if adapter.path.name == "adapter" else adapter.path).resolve().name
        adapters.append(adapter)
    names = [a.name for a in adapters]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise UserError(*[f"--adapter: two adapters are named {n!r}; name them with NAME=DIR" for n in twice])
    return adapters


def base_name(model: str | None, adapters: list[Adapter]) -> str:
    """What requests call the base model: its directory's name, its hub id, or the embedded model's name."""
    from philora.model import embedded

    source = model if model is not None else adapters[0].model.name_or_path if adapters else None
    if source is None:
        return embedded.NAME
    path = Path(source).expanduser()
    return path.resolve().name if path.exists() else source


def bind(host: str, port: int) -> ThreadingHTTPServer:
    family = {"address_family": socket.AF_INET6} if ":" in host else {}
    server_class = type("Server", (ThreadingHTTPServer,), family)
    try:
        return server_class((host, port), type("BoundHandler", (Handler,), {}))
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there: {e.strerror or e}") from None


def serve(server: ThreadingHTTPServer, api: Api) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully; a second signal cancels what is left."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            api.worker.cancel()
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    api.worker.thread.start()
    threading.Thread(target=server.serve_forever, name="philora-http", daemon=True).start()
    host, port = server.server_address[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
    print(f"philora: serving {', '.join(api.models)} at {url}", flush=True)
    while not stop.wait(0.5):
        pass
    print("philora: shutting down after the requests in progress (again to cancel them)", file=sys.stderr, flush=True)
    api.closing = True
    server.shutdown()
    api.worker.close()
    with api.idle:
        api.idle.wait_for(lambda: api.active == 0, timeout=30)
    server.server_close()
    for s, handler in previous.items():
        signal.signal(s, handler)
    return 0
