"""`philora serve` against hostile and unlucky clients: long stop strings, sampling values that overflow, prompts far
over the context and crowds of them, slow senders (slowloris), signals while they are connected, the API's
description without the key. The server is philora serve's own run() (serve() where real signals are sent) in this
process, with the real app, connections, worker, token loop and tokenizer, and a stand-in model that batches."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import select
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from philora import cli
from philora.infer import generation
from philora.infer.app import Api
from philora.infer.generation import BadPrompt, prompt_ids
from philora.infer.openai_api import MAX_STOP_CHARS
from philora.infer.serve import Limits, Shutdown, bind, exposure_warnings, run, serve, serving_encoder
from philora.infer.stops import StopText, partial_start
from philora.infer.worker import Worker

KEY = "sk-test-hardening"
WORDS = " one two three four five"  # every answer: these words over and over
BODY_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
)
HEADERS_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: "


class CountingModel(torch.nn.Module):
    """A stand-in model that batches: a row's next token is the word after its last token in WORDS (the first word
    after anything else), so every answer is WORDS over and over until max_tokens, sampled or not. Each forward
    pass is logged as (rows, width); it waits until `hold` is set, then `delay` seconds."""

    def __init__(self, encoder: Any) -> None:  # a ChatEncoder
        from transformers import Phi3Config

        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # generate() finds the device here
        self.vocab = max(encoder.tokenizer.get_vocab().values()) + 1
        self.config = Phi3Config(
            vocab_size=self.vocab,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            max_position_embeddings=1024,
        )
        words = encoder.tokenize([WORDS])[0]
        assert len(words) == 5
        self.next = dict(zip(words, words[1:] + words[:1], strict=True))
        self.first = words[0]
        self.calls: list[tuple[int, int]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.delay = 0.0

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> SimpleNamespace:
        self.calls.append((input_ids.shape[0], input_ids.shape[1]))
        self.hold.wait()
        time.sleep(self.delay)
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        for i, last in enumerate(input_ids[:, -1].tolist()):
            logits[i, 0, self.next.get(last, self.first)] = 30.0  # e^30 against 49k e^0: sampled as surely as greedy
        return SimpleNamespace(logits=logits)


@dataclass
class Served:
    api: Api
    model: CountingModel
    port: int

    def request(self, method: str, path: str, body: str | None = None, key: str | None = KEY) -> tuple[int, Any, Any]:
        """(status, body as JSON where it is JSON, headers)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        try:
            conn.request(method, path, body, headers)
            response = conn.getresponse()
            data = response.read()
            is_json = response.headers.get("content-type", "").startswith("application/json")
            return response.status, json.loads(data) if is_json else data, response.headers
        finally:
            conn.close()

    def ask(self, content: str = "Hi", **fields: Any) -> tuple[int, Any, Any]:
        body = {"model": "counting", "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}
        return self.request("POST", "/v1/chat/completions", json.dumps(body))


@pytest.fixture(scope="module")
def encoder(embedded_tokenizer: Path) -> Any:
    from transformers import AutoTokenizer

    return serving_encoder(AutoTokenizer.from_pretrained(embedded_tokenizer))


def wait_ready(port: int) -> None:
    until(lambda: _healthy(port), seconds=30)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def until(condition: Callable[[], Any], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def counting_api(encoder: Any, max_queue: int = 8, batch_tokens: int | None = None, key: str | None = KEY) -> Api:
    model = CountingModel(encoder)
    return Api("counting", [], Worker(model, encoder, max_queue, batch_tokens), key, max_new_tokens=256)


@contextlib.contextmanager
def served(encoder: Any, max_queue: int = 8, batch_tokens: int | None = None, key: str | None = KEY,
           **limits: Any) -> Iterator[Served]:  # fmt: skip
    """philora serve's run() in a thread on a port of its own, with Limits(**limits), until the test is done."""
    api = counting_api(encoder, max_queue, batch_tokens, key)
    sock, shutdown = bind("127.0.0.1", 0), Shutdown()
    thread = threading.Thread(target=run, args=(api, sock, Limits(**limits), shutdown), daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    wait_ready(port)
    try:
        yield Served(api, api.worker.model, port)
    finally:
        api.worker.model.hold.set()
        shutdown.signal()
        shutdown.signal()  # the second: whatever a failed test left generating is cancelled
        thread.join(timeout=30)


def pile(s: Served, bodies: list[dict[str, Any]], queued: int) -> list[tuple[int, Any, Any]]:
    """The replies to `bodies`, sent while the worker is held in another request's first step, so that they wait
    together; once `queued` of them wait in the queue and the others have been answered, the worker goes on."""
    s.model.hold.clear()
    blocker = threading.Thread(target=s.ask, kwargs={"max_tokens": 2})
    blocker.start()
    until(lambda: s.model.calls)
    replies: list[Any] = [None] * len(bodies)

    def send(i: int) -> None:
        replies[i] = s.ask(**bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    until(lambda: len(s.api.worker.waiting) == queued and sum(r is not None for r in replies) == len(bodies) - queued)
    s.model.hold.set()
    for t in [blocker, *threads]:
        t.join(timeout=30)
    return replies


def prefills(model: CountingModel) -> list[int]:
    """The rows of each batch the model was given, in order (a batch's first pass is its prompts)."""
    return [rows for rows, width in model.calls if width > 1]


# Stop strings


def test_stop_strings_cost_their_length_once_not_at_every_token() -> None:
    """Two 50,000-character stop strings that the answer keeps almost matching: comparing every start of each with
    the text's end at every token took ~0.3 s a token (30 s for 8 tokens at 250,000 characters, with every other
    client waiting); now it is ~0.1 s for them all. 2 s leaves room for a loaded machine."""
    stop = StopText(["a" * 50_000 + "!", "ab" * 25_000])
    deadline = time.monotonic() + 2.0
    released = ""
    for _ in range(64):
        released += stop.feed("aaaa")
        assert time.monotonic() < deadline, "feeding 64 tokens past 2 s"
    assert released == "" and not stop.hit and stop.flush() == "a" * 256  # all of it may still become the first


def first_cut(text: str, stops: list[str]) -> str:
    """The text before the first stop string to be complete (the longest, where several end at one place)."""
    for end in range(1, len(text) + 1):
        if done := [len(s) for s in stops if text[:end].endswith(s)]:
            return text[: end - max(done)]
    return text


def test_stop_strings_cut_where_the_first_completes_however_the_text_arrives() -> None:
    """Against a plain reading of the rule, on texts and stop strings over a small alphabet that overlap often."""
    rng = random.Random(0)
    for _ in range(500):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abc", k=rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        stop, released = StopText(stops), ""
        for piece in pieces:
            released += stop.feed(piece)
            if stop.hit:
                break
        released += "" if stop.hit else stop.flush()
        assert released == first_cut(text, stops), (text, stops, pieces)
        expected = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        assert partial_start(text, stops) == expected


def test_a_stop_string_over_the_limit_is_400_at_once_and_the_longest_allowed_cost_nothing(encoder: Any) -> None:
    with served(encoder) as s:
        replies: dict[str, Any] = {}

        def send(name: str, fields: dict[str, Any]) -> None:
            start = time.monotonic()
            replies[name] = (*s.ask(**fields), time.monotonic() - start)

        hostile = {"stop": ["a" * 250_000, "b" * 250_000], "max_tokens": 8}  # a 500 KB body
        threads = [threading.Thread(target=send, args=a) for a in (("hostile", hostile), ("other", {"max_tokens": 8}))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        status, body, _, seconds = replies["hostile"]
        assert (
            status == 400
            and body["error"]["param"] == "stop"
            and f"1 to {MAX_STOP_CHARS} characters" in (body["error"]["message"])
        )
        assert seconds < 3 and replies["other"][0] == 200 and replies["other"][3] < 3

        # The longest allowed: 16 stop strings of 256 characters that the answer follows for 255 of them.
        near = (WORDS * 11)[: MAX_STOP_CHARS - 1] + "!"
        start = time.monotonic()
        plain = s.ask(max_tokens=200)[1]["choices"][0]["message"]["content"]
        alone = time.monotonic() - start
        start = time.monotonic()
        status, body, _ = s.ask(max_tokens=200, stop=[near] * 16)
        assert status == 200 and body["choices"][0]["message"]["content"] == plain
        assert time.monotonic() - start < 3 * alone + 1.0
        status, body, _ = s.ask(max_tokens=200, stop=[near] * 15 + [" five one two three"])
        assert body["choices"][0]["message"]["content"] == " one two three four"
        assert body["choices"][0]["finish_reason"] == "stop"


# Sampling values


def test_a_seed_that_is_no_64_bit_integer_is_400_naming_seed(encoder: Any) -> None:
    with served(encoder) as s:
        for seed in (2**64, 2**63, -(2**63) - 1):
            status, body, _ = s.ask(seed=seed, temperature=1.0, max_tokens=2)
            assert status == 400 and body["error"]["param"] == "seed", seed
        for seed in (2**63 - 1, -(2**63)):
            assert s.ask(seed=seed, temperature=1.0, max_tokens=2)[0] == 200


def test_one_row_of_a_batch_never_fails_another(encoder: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three requests generated as one batch: temperatures so small that logits / temperature overflow (they are
    greedy), one whose sampling fails (seed 13, made to fail here), and a plain sampled one. Before, the batch
    shared one fate: 500 for all."""
    sample = generation._sample

    def failing(logits: torch.Tensor, settings: Any, generator: torch.Generator) -> int:
        if settings.seed == 13:
            raise RuntimeError("this row's sampling failed")
        return sample(logits, settings, generator)

    monkeypatch.setattr(generation, "_sample", failing)
    with served(encoder) as s:
        bodies = [{"temperature": t, "seed": 1, "max_tokens": 6} for t in (1e-300, 1e-40)]
        bodies += [{"temperature": 1.0, "seed": 13, "max_tokens": 6}, {"temperature": 1.0, "seed": 3, "max_tokens": 6}]
        replies = pile(s, bodies, queued=4)
        assert prefills(s.model) == [1, 4]  # the blocker, then the four together
        statuses = [status for status, _, _ in replies]
        assert statuses == [200, 200, 500, 200]
        for _, body, _ in [replies[0], replies[1], replies[3]]:
            assert body["choices"][0]["message"]["content"] == " one two three four five one"
        assert replies[2][1]["error"]["type"] == "server_error"


# Memory: the context checked on a prefix, the tokenizer's threads, batches and the queue in tokens


def test_a_prompt_far_over_the_context_is_refused_from_a_prefix(encoder: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4 MB message and a context of 256: what is tokenized stays under 16 characters a token of context (it was
    the whole 4 MB, ~1M tokens and hundreds of MB in the tokenizer)."""
    seen: list[int] = []
    tokenize = encoder.tokenize
    monkeypatch.setattr(encoder, "tokenize", lambda texts, *a: seen.append(len(texts[0])) or tokenize(texts, *a))
    with pytest.raises(BadPrompt, match=r"the prompt is over .* the model's context is 256 tokens"):
        prompt_ids(encoder, [{"role": "user", "content": "word " * 800_000}], context=256)
    assert max(seen) <= 16 * 256

    fits = [{"role": "user", "content": "word " * 20}]
    assert prompt_ids(encoder, fits, context=256) == encoder.ids(fits, generation_prompt=True)
    with pytest.raises(BadPrompt, match=r"^the prompt is \d+ tokens; the model's context is 256 tokens"):
        prompt_ids(encoder, [{"role": "user", "content": "word " * 300}], context=256)  # just over: counted whole


def test_prompts_are_tokenized_two_at_a_time_and_a_crowd_gets_503(
    encoder: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 requests at once, each taking 0.5 s to tokenize, with --max-queue 3: two are tokenized at a time, three
    wait for a turn, and three are refused 503 with Retry-After (before: all 8 at once, in starlette's pool)."""
    with served(encoder, max_queue=3) as s:
        now, most, lock = [0], [0], threading.Lock()
        tokenize = encoder.tokenize

        def slow(texts: list[str], *args: Any) -> list[list[int]]:
            with lock:
                now[0] += 1
                most[0] = max(most[0], now[0])
            time.sleep(0.5)
            with lock:
                now[0] -= 1
            return tokenize(texts, *args)

        monkeypatch.setattr(encoder, "tokenize", slow)
        replies: list[Any] = [None] * 8

        def send(i: int) -> None:
            replies[i] = s.ask(max_tokens=2)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert most[0] == 2
    refused = [r for r in replies if r[0] == 503]
    assert len(refused) == 3 and sum(r[0] == 200 for r in replies) == 5
    assert all(r[2]["Retry-After"] == "1" and r[1]["error"]["code"] == "overloaded" for r in refused)


def test_batches_and_the_queue_are_bounded_in_tokens(encoder: Any) -> None:
    """A batch takes rows x (longest prompt + longest answer) positions; with a budget of two requests' worth, four
    waiting requests go as two batches of two. The queue holds four budgets' worth of tokens; a request alone
    over the budget is 400."""
    prompt = len(prompt_ids(encoder, [{"role": "user", "content": "Hi"}]))
    budget = 2 * (prompt + 8) + 1
    with served(encoder, max_queue=64, batch_tokens=budget) as s:
        assert [r[0] for r in pile(s, [{"max_tokens": 8}] * 4, queued=4)] == [200] * 4
        assert prefills(s.model) == [1, 2, 2]

        status, body, _ = s.ask(max_tokens=budget)
        assert status == 400 and body["error"]["param"] == "max_tokens"
        assert f"--max-batch-tokens {budget}" in body["error"]["message"]

        replies = pile(s, [{"max_tokens": budget - prompt - 1}] * 5, queued=4)  # each budget - 1 tokens
        assert sorted(r[0] for r in replies) == [200, 200, 200, 200, 503]
        assert [r[2]["Retry-After"] for r in replies if r[0] == 503] == ["1"]


# Slow clients, signals


def read_until_closed(conn: socket.socket, seconds: float, drip: bool = False) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and when it did (`seconds` if it does not), sending
    a byte every 0.1 s meanwhile with `drip`."""
    start, received = time.monotonic(), b""
    while time.monotonic() - start < seconds:
        if not select.select([conn], [], [], 0.1)[0]:
            if drip:
                with contextlib.suppress(OSError):
                    conn.send(b"x")
            continue
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return received, time.monotonic() - start
        received += chunk
    return received, seconds


def slowloris(port: int, head: bytes, drip: bool, seconds: float = 5.0) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head)
        return read_until_closed(conn, seconds, drip)


def test_a_slowloris_is_answered_408_and_closed_after_the_read_timeout(encoder: Any) -> None:
    """--read-timeout 1: headers or a body a byte every 0.1 s are answered 408 and closed at 1 s, a connection that
    sends nothing is closed; before, all three were held for as long as they liked."""
    with served(encoder, read_timeout=1.0) as s:
        cases = {"headers": (HEADERS_HEAD, True), "body": (BODY_HEAD, True), "nothing": (b"", False)}
        outcomes: dict[str, tuple[bytes, float]] = {}

        def connect(name: str) -> None:
            outcomes[name] = slowloris(s.port, *cases[name])

        threads = [threading.Thread(target=connect, args=(name,)) for name in cases]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        for name in ("headers", "body"):
            reply, seconds = outcomes[name]
            assert reply.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in reply and 0.9 < seconds < 2.5, name
        assert outcomes["nothing"][0] == b"" and 0.9 < outcomes["nothing"][1] < 2.5
        assert s.ask(max_tokens=2)[0] == 200


def test_the_read_timeout_does_not_cut_a_slow_answer(encoder: Any) -> None:
    """Two answers of ~1 s on one keep-alive connection, with --read-timeout 0.5: the deadline is for the request
    to arrive, not for the answer."""
    with served(encoder, read_timeout=0.5) as s:
        s.model.delay = 0.04
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        body = {"model": "counting", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        for _ in range(2):
            conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["usage"]["completion_tokens"] == 20
        conn.close()


def signal_serve(api: Api, limits: Limits, clients: Callable[[int], None]) -> float:
    """serve() in this (the main) thread until the signals `clients(port)` sends from another end it; how long it
    took from the first signal (clients set it in `signalled`)."""
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=clients, args=(sock.getsockname()[1],), daemon=True)
    thread.start()
    assert serve(api, sock, limits) == 0
    took = time.monotonic() - signalled[0]
    thread.join(timeout=30)
    return took


signalled = [0.0]


def send_signal() -> None:
    signalled[0] = time.monotonic()
    os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_exits_at_once_with_slowloris_clients_connected(encoder: Any) -> None:
    """A client halfway through its headers and one halfway through its body, --read-timeout 60: SIGTERM closes the
    first, answers the second 503, and serve() returns within 2 s (before: it waited for the body, for ever)."""
    replies: dict[str, bytes] = {}

    def clients(port: int) -> None:
        wait_ready(port)
        with (
            socket.create_connection(("127.0.0.1", port)) as headers,
            socket.create_connection(("127.0.0.1", port)) as body,
        ):
            headers.sendall(HEADERS_HEAD)
            body.sendall(BODY_HEAD)
            time.sleep(0.3)  # both have been read as far as they go
            send_signal()
            replies["headers"] = read_until_closed(headers, 5)[0]
            replies["body"] = read_until_closed(body, 5)[0]

    took = signal_serve(counting_api(encoder), Limits(read_timeout=60), clients)
    assert took < 2.0
    assert replies["headers"] == b""
    assert replies["body"].startswith(b"HTTP/1.1 503") and b"shutting down" in replies["body"]


@pytest.mark.parametrize(("signals", "grace"), [(2, 30.0), (1, 0.5)], ids=["second-signal", "grace-runs-out"])
def test_a_second_signal_or_the_end_of_the_grace_cancels_the_answers_in_progress(
    encoder: Any, signals: int, grace: float
) -> None:
    """An answer of ~5 s is generating at SIGTERM, and a client is halfway through its body: a second signal, or
    --graceful-timeout 0.5, cancels the answer (503) and serve() returns within 2 s of it (before: the second
    signal cancelled the answer, and the server went on waiting for the body)."""
    api = counting_api(encoder)
    api.worker.model.delay = 0.02
    replies: list[Any] = []

    def clients(port: int) -> None:
        wait_ready(port)
        s = Served(api, api.worker.model, port)
        asking = threading.Thread(target=lambda: replies.append(s.ask(max_tokens=250)))
        asking.start()
        until(lambda: len(s.model.calls) >= 3)
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(BODY_HEAD)
            time.sleep(0.2)
            send_signal()
            if signals == 2:
                time.sleep(0.2)
                os.kill(os.getpid(), signal.SIGTERM)
            replies.append(read_until_closed(slow, 5)[0])
        asking.join(timeout=30)

    took = signal_serve(api, Limits(graceful_timeout=grace, read_timeout=60), clients)
    assert took < (0.2 if signals == 2 else grace) + 2.0
    [slow, (status, body, _)] = sorted(replies, key=lambda r: isinstance(r, tuple))
    assert slow.startswith(b"HTTP/1.1 503")
    assert status == 503 and body["error"]["message"] == "the server is shutting down"


# The key


def test_the_api_description_needs_the_key(encoder: Any) -> None:
    paths = ("/docs", "/redoc", "/openapi.json")
    with served(encoder) as s:
        for path in paths:
            status, body, _ = s.request("GET", path, key=None)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", path
            assert s.request("GET", path, key=KEY)[0] == 200, path
    with served(encoder, key=None) as s:
        assert [s.request("GET", path, key=None)[0] for path in paths] == [200] * 3


def test_warnings_for_a_server_others_can_reach_and_a_key_in_ps(capsys: pytest.CaptureFixture[str]) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        assert exposure_warnings(host, None, from_flag=False) == []
    [line] = exposure_warnings("0.0.0.0", None, from_flag=False)
    assert "--host 0.0.0.0 without an API key" in line and "PHILORA_API_KEY" in line
    [line] = exposure_warnings("0.0.0.0", "k", from_flag=True)
    assert "`ps`" in line and "PHILORA_API_KEY" in line
    assert exposure_warnings("10.1.2.3", "k", from_flag=False) == []

    with socket.socket() as busy:  # the command warns before it binds: a port in use ends it there, exit 2
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert cli.main(["serve", "--api-key", "k", "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.count("philora: warning:") == 1 and "--api-key is visible" in err and "cannot listen there" in err

    bad = ["serve", "--read-timeout", "0", "--graceful-timeout", "-1", "--max-batch-tokens", "0"]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert err.count("philora: error:") == 3 and "Traceback" not in err
    for flag in ("--read-timeout: 0", "--graceful-timeout: -1", "--max-batch-tokens: 0"):
        assert flag in err
