"""Memory of `philora serve` under large prompts: the server's RSS before, at its peak and after, per scenario.

    .venv/bin/python bench/serve_memory.py [--tree DIR] [--scenarios crowd,batch,long]

A real `philora serve` of the embedded model on 127.0.0.1 (one torch thread), its peak RSS reset once the model is
loaded (/proc/PID/clear_refs), so the peak is what the requests cost. Scenarios: `crowd`, 8 concurrent prompts of
about 4 MB (each far over the context); `batch`, 8 concurrent prompts of about 3,000 tokens; `long`, one prompt of
about 7,700 tokens. `--tree` serves the philora of another checkout (e.g. a `git worktree` of an older commit), so
before and after are measured by the same script on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {  # name: (prompts, words in each)
    "crowd": (8, 790_000),
    "batch": (8, 2_950),
    "long": (1, 7_700),
}


def status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def send(url: str, body: bytes, codes: list[int]) -> None:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            codes.append(response.status)
    except urllib.error.HTTPError as e:
        codes.append(e.code)


def measure(tree: Path, name: str) -> str:
    """One scenario on a fresh server: its line of results."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "philora", "serve", "--port", "0", "--max-new-tokens", "8"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=environment,
                            cwd=tree)  # fmt: skip
    assert proc.stdout is not None
    try:
        found = re.search(r"http://\S+/v1", proc.stdout.readline())
        if not found:
            raise SystemExit(f"serve_memory: philora serve did not start in {tree}")
        url = found.group() + "/chat/completions"
        time.sleep(1)
        idle = status_mb(proc.pid, "VmRSS")
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM from here on: the requests, not the loading
        count, words = SCENARIOS[name]
        bodies = [json.dumps({"model": "base", "max_tokens": 8,
                              "messages": [{"role": "user", "content": f"{i} " + "word " * words}]}).encode()
                  for i in range(count)]  # fmt: skip
        codes: list[int] = []
        started = time.monotonic()
        threads = [threading.Thread(target=send, args=(url, body, codes)) for body in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - started
        time.sleep(1)
        peak, after = status_mb(proc.pid, "VmHWM"), status_mb(proc.pid, "VmRSS")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    statuses = ", ".join(f"{c}: {codes.count(c)}" for c in sorted(set(codes)))
    return f"{name:<6} idle {idle:,.0f} MB, peak {peak:,.0f} MB, after {after:,.0f} MB, {took:.1f} s ({statuses})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose philora is served (default: this one)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    args = p.parse_args()
    print(f"serve_memory: philora of {args.tree.resolve()}")
    for name in args.scenarios.split(","):
        print(measure(args.tree, name), flush=True)


if __name__ == "__main__":
    main()
