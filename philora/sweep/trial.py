"""One trial: `philora train` run as a subprocess into its own dir, its output to a log beside (not inside) that
dir, its metrics.jsonl read as it grows so that the sweep can stop a trial going nowhere.

The log lives in the sweep's logs/: `philora train` refuses to write a run into a dir that already holds files it
did not write. On Linux the trial is told to end when the sweep dies (kill -9 included), so that no orphan trains on
after it; the sweep's rerun tries the interrupted trial's values again.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

TRAIN = (sys.executable, "-m", "philora", "train")  # what a trial runs; tests put a stub script in its place
POLL = 1.0  # seconds between reads of metrics.jsonl
GRACE = 10.0  # seconds a stopped trial gets to end on SIGTERM before it is killed
TAIL = 8  # log lines shown for a failed trial


def command_line(
    train: Sequence[str], config: str | None, overrides: Sequence[str], sets: Sequence[str], root: Path
) -> list[str]:
    """The trial's command: the user's --config and --set, then the sweep's own (`sets`: the sampled values and any
    evaluation added for pruning), then its output dir; a later --set wins, so the sweep's own come last."""
    argv = [*train, *(["--config", config] if config else [])]
    for item in [*overrides, *sets, f"training_config.output_dir={root}", "training_config.overwrite_output_dir=true"]:
        argv += ["--set", item]
    return [*argv, "-q"]


@dataclass
class Outcome:
    """How a trial's process ended: `complete` (exit 0), `pruned` (stopped by the sweep) or `failed`."""

    status: Literal["complete", "pruned", "failed"]
    returncode: int
    seconds: float
    tail: list[str] = field(default_factory=list)  # a failed trial's last log lines


class MetricsTail:
    """The records appended to a growing metrics.jsonl since the last read. A line still being written (no newline
    yet) waits for the next read; a file that shrank (rewritten) is read again from its start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_records(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:
                    self.offset = 0
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        whole = data[: data.rfind(b"\n") + 1]
        self.offset += len(whole)
        records = []
        for line in whole.decode("utf-8", "replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


def run(argv: list[str], log: Path, metrics: Path, stop: Callable[[list[dict[str, Any]]], bool],
        poll: float = POLL) -> Outcome:  # fmt: skip
    """Run one trial to its end, handing each batch of new metrics.jsonl records to `stop`; when it says so, the
    trial is ended (SIGTERM, then SIGKILL after GRACE seconds) and counts as pruned. A KeyboardInterrupt ends the
    trial too, and goes on up."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tail = MetricsTail(metrics)
    with log.open("wb") as out:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log current while the trial runs
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   preexec_fn=_end_with_parent if sys.platform == "linux" else None)  # fmt: skip
        try:
            while True:
                try:
                    process.wait(timeout=poll)
                    finished = True
                except subprocess.TimeoutExpired:
                    finished = False
                records = tail.new_records()
                if records and stop(records) and not finished:
                    _end(process)
                    return Outcome("pruned", process.returncode, time.monotonic() - started)
                if finished:
                    break
        finally:
            if process.poll() is None:  # an interrupt or an error in `stop`: no trial outlives the sweep
                _end(process)
    seconds = time.monotonic() - started
    if process.returncode == 0:
        return Outcome("complete", 0, seconds)
    return Outcome("failed", process.returncode, seconds, last_lines(log))


def last_lines(log: Path, n: int = TAIL) -> list[str]:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if line.strip()][-n:]


def _end(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


PR_SET_PDEATHSIG = 1  # prctl(2)


def _end_with_parent() -> None:
    """In the child, before exec: SIGTERM when the sweep's process dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):  # no prctl here: the sweep ends its trials itself
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
