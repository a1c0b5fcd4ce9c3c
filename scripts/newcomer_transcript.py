"""The newcomer's path through philora, run for real and written down: docs/newcomer.md.

A CSV of date conversions (scripts/make_dates_data.py) goes through init → check → train → eval → chat → serve →
merge → export on the embedded model, in a scratch folder; every command and what it printed (progress lines
elided) go into the transcript, with the time each took and the machine it ran on. Rerun it after a change to any
of those commands so the document stays true:

    .venv/bin/python scripts/newcomer_transcript.py [--output docs/newcomer.md] [--keep DIR]

About 10 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOISE = re.compile(r"(Loading weights|it/s\]|step/s|s/step)")  # progress bars: a terminal's, not a transcript's
LONGEST = 60  # lines kept of one command's output; the middle of a longer one is elided


def cpu_kind() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    kind = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no bf16 arithmetic"
    return f"{os.cpu_count()}-core {model} ({kind})"


class Transcript:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.parts: list[str] = []
        self.env = {**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}

    def run(self, shown: str, argv: list[str], stdin: str | None = None, note: str = "") -> str:
        """Run `argv` in the folder, show it as `shown` with its output; stop on a failure."""
        started = time.time()
        done = subprocess.run(argv, cwd=self.folder, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=self.env)  # fmt: skip
        seconds = time.time() - started
        output = self.clean(done.stdout)
        self.parts.append(f"{note}\n\n" if note else "")
        self.parts[-1] += f"```console\n$ {shown}\n{output}\n```\n*{seconds:.0f} s, exit {done.returncode}*\n"
        if done.returncode != 0:
            sys.exit(f"{shown} failed ({done.returncode}):\n{output}")
        return done.stdout

    def clean(self, text: str) -> str:
        lines = [line.rstrip() for line in text.replace("\r", "\n").splitlines()]
        lines = [line.replace(str(self.folder) + os.sep, "").replace(str(self.folder), ".") for line in lines
                 if line.strip() and not NOISE.search(line)]  # fmt: skip
        if len(lines) > LONGEST:
            half = LONGEST // 2
            lines = [*lines[:half], f"... ({len(lines) - LONGEST} lines)", *lines[-half:]]
        return "\n".join(lines)


def philora(*args: str) -> list[str]:
    return [sys.executable, "-m", "philora", *args]


def serve_once(transcript: Transcript) -> None:
    """Start `philora serve`, ask it one question over HTTP, stop it; the server's output and the answer shown."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = philora("serve", "--adapter", "dates=out/dates", "--port", str(port))
    server = subprocess.Popen(argv, cwd=transcript.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=transcript.env)  # fmt: skip
    started, lines = time.time(), []
    assert server.stdout is not None
    for line in server.stdout:
        lines.append(line)
        if "serving" in line:
            break
    body = {"model": "dates", "messages": [{"role": "user", "content": "Write 2031-05-17 as a date in words."}]}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    server.terminate()
    rest, _ = server.communicate(timeout=60)
    output = transcript.clean("".join(lines) + rest)
    shown = json.dumps({"choices": [{"message": answer["choices"][0]["message"]}], "usage": answer["usage"]})
    transcript.parts.append(
        f"```console\n$ philora serve --adapter dates=out/dates --port {port} &\n{output}\n"
        f"$ curl -s localhost:{port}/v1/chat/completions -d '{json.dumps(body)}'\n{shown}\n```\n"
        f"*{time.time() - started:.0f} s from start to answer*\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "newcomer.md")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a scratch folder)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="philora-newcomer-"))
    folder.mkdir(parents=True, exist_ok=True)
    t = Transcript(folder.resolve())
    started = time.time()
    t.run("python scripts/make_dates_data.py data", [sys.executable, str(ROOT / "scripts" / "make_dates_data.py"),
          "data"], note="Your data: 200 questions and answers in a CSV, and 40 held out.")  # fmt: skip
    t.run("head -3 data/dates.csv", ["head", "-3", "data/dates.csv"])
    t.run("philora init data/dates.csv --eval data/dates-eval.csv",
          philora("init", "data/dates.csv", "--eval", "data/dates-eval.csv"),
          note="`init` reads the data and writes a config for it on this machine.")  # fmt: skip
    t.run("cat dates.yaml", ["cat", "dates.yaml"])
    t.run("philora check --config dates.yaml --time", philora("check", "--config", "dates.yaml", "--time"),
          note="`check` reads and measures everything before the real run; `--time` trains a few steps.")  # fmt: skip
    t.run("philora train --config dates.yaml", philora("train", "--config", "dates.yaml"),
          note="Training answers the held-out questions before and after, and prints both.")  # fmt: skip
    t.run("philora eval --adapter out/dates", philora("eval", "--adapter", "out/dates"),
          note="`eval` scores the run again, reusing the answers the run saved where it can.")  # fmt: skip
    t.run(
        "printf 'Convert March 9, 2044 to YYYY-MM-DD.\\nexit\\n' | philora chat --adapter out/dates",
        philora("chat", "--adapter", "out/dates"),
        stdin="Convert March 9, 2044 to YYYY-MM-DD.\nexit\n",
        note="`chat` reads from a pipe as well as from a terminal; `exit` leaves it.",
    )
    serve_once(t)
    t.run("philora merge --adapter out/dates --output out/dates-merged",
          philora("merge", "--adapter", "out/dates", "--output", "out/dates-merged"))  # fmt: skip
    t.run(
        "philora export gguf --merged out/dates-merged --output out/dates.gguf --type q8_0",
        philora("export", "gguf", "--merged", "out/dates-merged", "--output", "out/dates.gguf", "--type", "q8_0"),
    )
    header = (
        "# A newcomer's path, as it runs\n\n"
        f"Generated by `scripts/newcomer_transcript.py` on {time.strftime('%Y-%m-%d')}, on a {cpu_kind()}, "
        f"{(time.time() - started) / 60:.0f} minutes in all; the embedded model (SmolLM2-135M-Instruct as Phi-3). "
        "Progress bars are left out; paths are relative to the scratch folder it ran in.\n\n"
    )
    args.output.write_text(header + "\n".join(t.parts))
    print(f"wrote {args.output}")
    if args.keep is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
