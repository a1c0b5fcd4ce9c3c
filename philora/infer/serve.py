"""`philora serve`: an OpenAI-compatible HTTP server for the base model and any number of adapters.

Endpoints: `POST /v1/chat/completions` (JSON, or Server-Sent Events with `stream: true`), `GET /v1/models`,
`GET /v1/models/{id}`, `GET /health`, and the OpenAPI description at `/docs` and `/openapi.json`. The request's
`model` picks an adapter by name, or the base model by its own name (or `base`). As in OpenAI's API,
`temperature` defaults to 1; send 0 for greedy answers. With `tools`, answers are read for tool calls in the
chat template's syntax and returned as OpenAI's `tool_calls`; `tool_choice` "required" or a named function makes
the answer start with the opening of a call.

The rooms: openai_api.py is the wire format (pydantic models, every bad field in one 400); app.py the FastAPI
app (routes, OpenAI's error bodies, the request size limit, streaming); tool_calls.py reads calls out of
answers; worker.py is the one thread that owns the model. This module is the command: it checks the flags,
binds the port before the model loads, and runs uvicorn in a thread while the main thread waits for signals.

One model on one device: a single worker thread owns it. Requests are checked and tokenized off the event loop
and put on a bounded queue; a full queue is answered 503 at once. The worker takes the oldest request and the
other waiting ones for the same adapter and generates them as one left-padded batch; the model is switched
between adapters only there. SIGTERM or SIGINT: stop accepting, answer the requests already accepted, exit 0;
a second signal cancels those.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from philora.data.render import ChatEncoder
from philora.errors import UserError
from philora.infer.adapters import Adapter, read_adapter
from philora.infer.app import Api, build_app
from philora.infer.worker import Worker

# uvicorn's own lines and one line per request, on stderr: stdout holds only the line that says where it serves.
LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "philora: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        "uvicorn.access": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}


def main(args: argparse.Namespace) -> int:
    from philora.infer.adapters import load

    max_body_mb = args.max_body_mb
    problems = [f"--max-queue: {args.max_queue}; give a number >= 1"] if args.max_queue < 1 else []
    if max_body_mb <= 0:
        problems.append(f"--max-body-mb: {max_body_mb}; give a size in MB > 0")
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
    sock = bind(args.host, args.port)  # before the model loads: a port in use fails at once
    model, tokenizer = load(adapters, args.model, args.dtype)
    key = args.api_key or os.environ.get("PHILORA_API_KEY") or None
    worker = Worker(model, serving_encoder(tokenizer), args.max_queue)
    api = Api(base, [a.name for a in adapters], worker, key, args.max_new_tokens)
    return serve(api, sock, int(max_body_mb * (1 << 20)))


def serving_encoder(tokenizer: Any) -> ChatEncoder:
    """The chat encoder, able to render tools where the template can be given that (a ChatML one without)."""
    encoder = ChatEncoder(tokenizer)
    if encoder.tool_style == "chatml":
        encoder.use_tools()
    return encoder


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


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; UserError where it cannot be had."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen()
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there: {e.strerror or e}") from None
    return sock


def serve(api: Api, sock: socket.socket, max_body: int) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully; a second signal cancels what is left."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            api.worker.cancel()
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(api, sock, max_body, stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def run(api: Api, sock: socket.socket, max_body: int, stop: threading.Event) -> None:
    """Serve on `sock` until `stop` is set; then take no new requests, answer the accepted ones, and return.
    uvicorn runs in its own thread (so it leaves the signals to `serve`) with its own event loop."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(build_app(api, max_body), log_config=LOG_CONFIG))
    api.worker.thread.start()
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="philora-http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise RuntimeError("the HTTP server stopped as it started; see the log above")
        stop.wait(0.05)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
    print(f"philora: serving {', '.join(api.models)} at {url}", flush=True)
    stop.wait()
    print("philora: shutting down after the requests in progress (again to cancel them)", file=sys.stderr, flush=True)
    api.closing = True
    server.should_exit = True
    http.join()  # uvicorn waits for the open requests, which wait for their jobs
    api.worker.close()
