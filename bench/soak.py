"""Soak: `philora serve` under a mix of normal, streaming, cancelled and hostile clients, on loopback only.

    .venv/bin/python bench/soak.py [--minutes 10] [--clients 4] [--model DIR] [--adapter DIR] [--json FILE]

A real `philora serve` process (the embedded model unless --model) is started on 127.0.0.1 with an API key. First
the normal request is timed alone (the baseline); then `--clients` threads send a weighted mix for `--minutes`:
normal answers, streamed answers, streams the client drops after the first chunk, and hostile requests (stop
strings at and over the length limit, a temperature of 1e-300, a seed of 2**64, a 4 MB prompt, a prompt over the
context, broken JSON, a body that stops half way, slowloris connections that dribble their headers). Every request
has its own timeout and the whole run stops by itself at the deadline or after `--max-requests`.

Printed: each kind's count and status codes; the normal requests' p50/p99 latency under the mix beside the
baseline, as a ratio; the server's RSS every `--rss-every` seconds (the curve), its start, peak and end. The run
fails (exit 1) if the server answered 500 or died: hostile requests must get 4xx, or 503 with Retry-After.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-soak"
TIMEOUT = 120.0  # seconds any one request may take before the client gives up on it
SLOWLORIS_AT_ONCE = 8
HOSTILE = ("long stops", "stops over limit", "tiny temperature", "huge seed", "4 MB prompt", "over context",
           "broken JSON", "half a body", "slowloris")  # fmt: skip


@dataclass
class Tally:
    """What the clients saw, shared between their threads."""

    statuses: dict[str, Counter[int | str]] = field(default_factory=lambda: defaultdict(Counter))
    normal_latency: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    slowloris: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(SLOWLORIS_AT_ONCE))

    def add(self, kind: str, status: int | str, latency: float | None = None) -> None:
        with self.lock:
            self.statuses[kind][status] += 1
            if latency is not None:
                self.normal_latency.append(latency)


class Client:
    """Requests to one server, each on its own connection, as the kinds of client the soak mixes."""

    def __init__(self, host: str, port: int, model: str) -> None:
        self.host, self.port, self.model = host, port, model

    def _connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)

    def _body(self, prompt: str, **extra: object) -> bytes:
        messages = [{"role": "user", "content": prompt}]
        return json.dumps({"model": self.model, "messages": messages, "max_tokens": 24, **extra}).encode()

    def post(self, body: bytes) -> int:
        """Send a whole body, read the whole answer; its status."""
        conn = self._connection()
        try:
            conn.request("POST", "/v1/chat/completions", body, self._headers())
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def _headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}

    def normal(self, rng: random.Random) -> int:
        return self.post(self._body(f"Say something about the number {rng.randrange(1000)}.", temperature=0))

    def stream(self, rng: random.Random, drop: bool) -> int:
        """A streamed answer, read to its end, or dropped (the connection closed) after its first chunk."""
        conn = self._connection()
        try:
            body = self._body(f"Count from {rng.randrange(100)}.", stream=True, temperature=0.7, seed=rng.randrange(9))
            conn.request("POST", "/v1/chat/completions", body, self._headers())
            response = conn.getresponse()
            if response.status != 200:
                response.read()
                return response.status
            if drop:
                response.fp.readline()
                return 200
            if b"[DONE]" not in response.read():
                return "no [DONE]"
            return 200
        finally:
            conn.close()

    def hostile(self, rng: random.Random, tally: Tally) -> tuple[str, int | str]:
        """One hostile request, chosen at random: (its name, the status it got)."""
        name = rng.choice(HOSTILE)
        if name == "long stops":
            return name, self.post(self._body("Hi.", stop=["x" * 256] * 4, temperature=0))
        if name == "stops over limit":
            return name, self.post(self._body("Hi.", stop=["y" * 250_000, "z" * 250_000]))
        if name == "tiny temperature":
            return name, self.post(self._body("Hi.", temperature=1e-300))
        if name == "huge seed":
            return name, self.post(self._body("Hi.", temperature=1.0, seed=2**64))
        if name == "4 MB prompt":
            return name, self.post(self._body("lorem ipsum " * 330_000))
        if name == "over context":
            return name, self.post(self._body("word " * 20_000))
        if name == "broken JSON":
            return name, self.post(b'{"model": "x", "messages": [')
        if name == "half a body":
            return name, self.half_body()
        if not tally.slowloris.acquire(blocking=False):
            return name, "skipped (8 open)"
        try:
            return name, self.slowloris()
        finally:
            tally.slowloris.release()

    def half_body(self) -> int | str:
        """Headers promising 1 MB, a few bytes of it, then silence: the server should time out the read."""
        with socket.create_connection((self.host, self.port), timeout=TIMEOUT) as sock:
            head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                    f"Authorization: Bearer {KEY}\r\nContent-Length: 1000000\r\n\r\n{{\"model\":")  # fmt: skip
            sock.sendall(head.encode())
            return _answer_or_close(sock)

    def slowloris(self) -> int | str:
        """A header line every 2 s, never the blank line that ends them: the server should close it."""
        with socket.create_connection((self.host, self.port), timeout=TIMEOUT) as sock:
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}\r\n".encode())
            started = time.monotonic()
            try:
                while time.monotonic() - started < TIMEOUT:
                    if select.select([sock], [], [], 2.0)[0]:
                        return _answer_or_close(sock)
                    sock.sendall(f"X-Slow-{random.randrange(10**6)}: 1\r\n".encode())
            except OSError:
                return "closed"
            return "held to the client's timeout"


def _answer_or_close(sock: socket.socket) -> int | str:
    """The status the server answered with on a raw socket, or how the connection ended without one."""
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return "held to the client's timeout"
    except OSError:
        return "closed"
    found = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(found.group(1)) if found else "closed"


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str, int, str]:
    """`philora serve` on 127.0.0.1, any free port; (process, host, port, the base model's served name)."""
    command = [sys.executable, "-m", "philora", "serve", "--host", "127.0.0.1", "--port", "0",
               "--max-new-tokens", "32"]  # fmt: skip
    if args.model:
        command += ["--base", args.model]
    if args.adapter:
        command += ["--adapter", f"tuned={args.adapter}"]
    environment = {**os.environ, "PHILORA_API_KEY": KEY}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=environment)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"serving (.+?) at http://127\.0\.0\.1:(\d+)/v1", line)
    if not found:
        proc.kill()
        raise SystemExit(f"soak: philora serve did not start (its output: {line!r})")
    model = "tuned" if args.adapter else found.group(1).split(", ")[0]
    return proc, "127.0.0.1", int(found.group(2)), model


def rss_mb(pid: int) -> float:
    """The process's resident memory now, in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def mix(client: Client, tally: Tally, deadline: float, budget: list[int], seed: int) -> None:
    """One client thread: weighted kinds until the deadline or until the shared request budget runs out."""
    rng = random.Random(seed)
    kinds = ["normal"] * 4 + ["stream"] * 2 + ["dropped stream", "hostile", "hostile", "hostile"]
    while time.monotonic() < deadline:
        with tally.lock:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        kind = rng.choice(kinds)
        started = time.monotonic()
        try:
            if kind == "normal":
                status: int | str = client.normal(rng)
                tally.add(kind, status, time.monotonic() - started if status == 200 else None)
                continue
            if kind == "hostile":
                kind, status = client.hostile(rng, tally)
                kind = f"hostile: {kind}"
            else:
                status = client.stream(rng, drop=kind == "dropped stream")
        except (OSError, http.client.HTTPException) as e:
            status = type(e).__name__
        tally.add(kind, status)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long the mix runs")
    p.add_argument("--clients", type=int, default=4, help="client threads sending at once")
    p.add_argument("--baseline", type=int, default=10, help="normal requests timed alone first")
    p.add_argument("--max-requests", type=int, default=20_000, help="stop after this many, whatever the time")
    p.add_argument("--rss-every", type=float, default=30.0, metavar="S", help="seconds between RSS samples")
    p.add_argument("--model", metavar="DIR", help="the base model (default: the embedded one)")
    p.add_argument("--adapter", metavar="DIR", help="serve this adapter and send the requests to it")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()

    proc, host, port, model = start_server(args)
    client, tally = Client(host, port, model), Tally()
    try:
        client.normal(random.Random(0))  # warm-up, untimed
        alone = []
        for i in range(args.baseline):
            started = time.monotonic()
            status = client.normal(random.Random(i))
            alone.append(time.monotonic() - started)
            if status != 200:
                raise SystemExit(f"soak: a normal request alone got {status}")
        curve = [(0.0, rss_mb(proc.pid))]
        start = time.monotonic()
        deadline = start + args.minutes * 60
        budget = [args.max_requests]
        threads = [threading.Thread(target=mix, args=(client, tally, deadline, budget, seed), daemon=True)
                   for seed in range(args.clients)]  # fmt: skip
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and proc.poll() is None:
            sample = time.monotonic() + args.rss_every
            while time.monotonic() < sample and any(t.is_alive() for t in threads):
                time.sleep(0.2)
            if proc.poll() is None:
                curve.append((time.monotonic() - start, rss_mb(proc.pid)))
        died = proc.poll() is not None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return report(args, tally, alone, curve, died)


def report(args: argparse.Namespace, tally: Tally, alone: list[float], curve: list[tuple[float, float]],
           died: bool) -> int:  # fmt: skip
    print(f"soak: {args.clients} clients for {args.minutes:g} min on 127.0.0.1; the server's RSS every "
          f"{args.rss_every:g}s")  # fmt: skip
    for kind in sorted(tally.statuses):
        counts = ", ".join(f"{status}: {n}" for status, n in tally.statuses[kind].most_common())
        print(f"  {kind:<28} {sum(tally.statuses[kind].values()):>6}   {counts}")
    under = tally.normal_latency
    base_p50, p50, p99 = statistics.median(alone), percentile(under, 0.5), percentile(under, 0.99)
    print(f"normal requests alone: p50 {base_p50:.2f}s over {len(alone)}")
    print(f"normal requests in the mix: p50 {p50:.2f}s, p99 {p99:.2f}s over {len(under)} "
          f"(p50 ratio mix / alone {p50 / base_p50:.2f}x)")  # fmt: skip
    print("RSS MB: " + ", ".join(f"{t:.0f}s {mb:.0f}" for t, mb in curve))
    rss = [mb for _, mb in curve]
    print(f"RSS MB: start {rss[0]:.0f}, peak {max(rss):.0f}, end {rss[-1]:.0f}")
    errors = sum(n for counts in tally.statuses.values() for status, n in counts.items() if status == 500)
    if args.json:
        results = {"statuses": {k: {str(s): n for s, n in v.items()} for k, v in tally.statuses.items()},
                   "alone": alone, "normal_latency": under, "rss_mb": curve, "server_died": died}  # fmt: skip
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if died or errors:
        print(f"soak: FAILED: {'the server died; ' if died else ''}{errors} answers were 500")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
