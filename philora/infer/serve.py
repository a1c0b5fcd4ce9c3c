"""`philora serve`: an OpenAI-compatible HTTP server for the base model and any number of adapters.

Endpoints: `POST /v1/chat/completions` (JSON, or Server-Sent Events with `stream: true`), `GET /v1/models`,
`GET /v1/models/{id}`, `GET /health`, and the OpenAPI description at `/docs`, `/redoc` and `/openapi.json`
(behind the key, when there is one). The request's `model` picks an adapter by name, or the base model by its own
name (or `base`). As in OpenAI's API, `temperature` defaults to 1; send 0 (or anything below 1e-5) for greedy
answers. With `tools`, answers are read for tool calls in the chat template's syntax and returned as OpenAI's
`tool_calls`; `tool_choice` "required" or a named function makes the answer start with the opening of a call.

The rooms: openai_api.py is the wire format (pydantic models, every bad field in one 400); app.py the FastAPI
app (routes, OpenAI's error bodies, the request size limit, streaming); tool_calls.py reads calls out of
answers; worker.py is the one thread that owns the model; connections.py holds the connections to a read
deadline. This module is the command: it checks the flags, binds the port before the model loads, and runs
uvicorn in a thread while the main thread waits for signals.

One model on one device: a single worker thread owns it. Requests are checked and tokenized off the event loop
(two at a time) and put on a queue bounded in requests and tokens; a full queue is answered 503 at once. The
worker takes the oldest request and the other waiting ones for the same adapter that fit the batch's token
budget, and generates them as one left-padded batch; the model is switched between adapters only there.
A request's headers and body must arrive within --read-timeout; a slower client is answered 408 and closed.
SIGTERM or SIGINT: stop accepting, close the connections still sending, answer the requests already accepted
for up to --graceful-timeout seconds, then cancel what is left (503) and exit 0; a second signal cancels at once.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from philora import progress
from philora.data.render import ChatEncoder
from philora.errors import UserError
from philora.flags import BASE, typed
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


KEEP_ALIVE = 5  # seconds an idle connection stays open between requests (uvicorn's default)
CANCEL_WAIT = 5.0  # seconds the cancelled answers get to send their 503 before the server closes regardless


@dataclass
class Limits:
    """What one client may take of the server's time and memory, besides the batch and queue budgets."""

    max_body: int = 4 << 20  # bytes of a request body (--max-body-mb)
    read_timeout: float = 30.0  # seconds for a request's headers and body to arrive (--read-timeout)
    graceful_timeout: float = 30.0  # seconds the answers in progress get after SIGTERM (--graceful-timeout)


@dataclass
class Shutdown:
    """The signals: the first asks for a graceful stop, the second for the answers in progress to be cancelled."""

    stop: threading.Event = field(default_factory=threading.Event)
    now: threading.Event = field(default_factory=threading.Event)

    def signal(self, signum: int = 0, frame: Any = None) -> None:
        (self.now if self.stop.is_set() else self.stop).set()

    def wait(self, thread: threading.Thread, seconds: float) -> bool:
        """Wait for `thread` to end, at most `seconds` or until a second signal; whether it ended."""
        deadline = time.monotonic() + seconds
        while thread.is_alive() and not self.now.is_set() and time.monotonic() < deadline:
            thread.join(0.05)
        return not thread.is_alive()


def main(args: argparse.Namespace) -> int:
    from philora.infer.adapters import load

    if problems := flag_problems(args):
        raise UserError(*problems)
    key = args.api_key or os.environ.get("PHILORA_API_KEY") or None
    for line in exposure_warnings(args.host, key, from_flag=bool(args.api_key)):
        print(f"philora: warning: {line}", file=sys.stderr, flush=True)
    adapters = adapters_of(args.adapters)
    base = base_name(args.base, adapters)
    if base in {a.name for a in adapters}:
        raise UserError(f"--adapter {base}=...: the base model is served under that name; name the adapter otherwise")
    sock = bind(args.host, args.port)  # before the model loads: a port in use fails at once
    model, tokenizer = load(adapters, args.base, args.dtype, args.trust_remote_code, typed(args, "base", BASE))
    worker = Worker(model, serving_encoder(tokenizer), args.max_queue, args.max_batch_tokens)
    api = Api(base, [a.name for a in adapters], worker, key, args.max_new_tokens)
    return serve(api, sock, Limits(int(args.max_body_mb * (1 << 20)), args.read_timeout, args.graceful_timeout))


def flag_problems(args: argparse.Namespace) -> list[str]:
    """One line per bad flag."""
    problems = [f"--max-queue: {args.max_queue}; give a number >= 1"] if args.max_queue < 1 else []
    if args.max_body_mb <= 0:
        problems.append(f"--max-body-mb: {args.max_body_mb}; give a size in MB > 0")
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens: {args.max_new_tokens}; give a number of tokens >= 1")
    if args.max_batch_tokens is not None and args.max_batch_tokens < 1:
        problems.append(f"--max-batch-tokens: {args.max_batch_tokens}; give a number of tokens >= 1")
    if not 0 <= args.port < 65536:
        problems.append(f"--port: {args.port}; give a port from 0 (any free one) to 65535")
    if not args.read_timeout > 0:
        problems.append(f"--read-timeout: {args.read_timeout}; give seconds > 0")
    if not args.graceful_timeout >= 0:
        problems.append(f"--graceful-timeout: {args.graceful_timeout}; give seconds >= 0")
    return problems


def exposure_warnings(host: str, key: str | None, from_flag: bool) -> list[str]:
    """What is unsafe about serving on `host` with `key`: no key where others can reach the port; a key given on
    the command line, which every user of the machine can read in `ps`."""
    warnings = []
    if key is None and not is_loopback(host):
        reach = "anyone who can reach the port can use the model"
        warnings.append(f"--host {host} without an API key: {reach}; set PHILORA_API_KEY")
    if from_flag:
        warnings.append("--api-key is visible to other users of this machine in `ps`; set PHILORA_API_KEY instead")
    return warnings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def serving_encoder(tokenizer: Any) -> ChatEncoder:
    """The chat encoder, able to render tools where the template can be given that (a ChatML one without). Said
    in one line: most clients send no tools, and `chat --tools` and `train` say more where tools are used."""
    encoder = ChatEncoder(tokenizer)
    if encoder.tool_style == "chatml":
        encoder.use_tools(say=False)
        progress.say("requests with tools are rendered with philora's ChatML tools template (the model's own has none)")
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


def serve(api: Api, sock: socket.socket, limits: Limits) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully; a second signal cancels what is left."""
    shutdown = Shutdown()
    previous = {s: signal.signal(s, shutdown.signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(api, sock, limits, shutdown)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def run(api: Api, sock: socket.socket, limits: Limits, shutdown: Shutdown) -> None:
    """Serve on `sock` until `shutdown.stop` is set; then take no new requests and answer the accepted ones until
    they are done, `limits.graceful_timeout` passes or `shutdown.now` is set, cancel what is left, and return.
    uvicorn runs in its own thread (so it leaves the signals to `serve`) with its own event loop."""
    import uvicorn

    from philora.infer.connections import TimedH11Protocol

    # uvicorn makes its protocol by calling the class it is given, with keywords: a partial of one does as well.
    protocol: Any = functools.partial(TimedH11Protocol, read_timeout=limits.read_timeout)
    app = build_app(api, limits.max_body)
    config = uvicorn.Config(app, http=protocol, timeout_keep_alive=KEEP_ALIVE, log_config=LOG_CONFIG)
    server = uvicorn.Server(config)
    api.worker.thread.start()
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="philora-http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise RuntimeError("the HTTP server stopped as it started; see the log above")
        shutdown.stop.wait(0.05)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
    print(f"philora: serving {', '.join(api.models)} at {url}", flush=True)
    shutdown.stop.wait()
    grace = limits.graceful_timeout
    say(f"shutting down: the requests in progress have {grace:g} s to finish (a second signal cancels them)")
    api.closing = True
    server.should_exit = True  # uvicorn stops listening, closes idle connections, waits for the open requests
    if not shutdown.wait(http, grace):
        say("cancelling the requests still in progress")
        api.worker.cancel()  # each answered 503 at its next token
        http.join(CANCEL_WAIT)
        server.force_exit = True
        http.join()
    api.worker.close()


def say(line: str) -> None:
    print(f"philora: {line}", file=sys.stderr, flush=True)
