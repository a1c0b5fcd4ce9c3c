"""What philora says while it works: the command's verbosity (-q/-v), notices, and progress through long phases.

A phase (reading data, answering the eval prompts, training, an eval pass) shows a tqdm bar with its ETA on a
terminal. Where stderr is a log (CI, nohup, a file) a bar is a mess of carriage returns, so there a phase writes a
plain line every LOG_EVERY seconds and one at its end, e.g. `philora: answers of the fine-tuned model: 24/40
prompts, 1m05s, about 45s left`. A phase over within SHORT seconds says nothing: most runs have several such.

The verbosity is the one setting here, set by the CLI once per command; `say`, the phases and train's data lines
read it. Quiet keeps warnings, errors and results; verbose adds the libraries' own logs and the full data report.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

QUIET, NORMAL, VERBOSE = -1, 0, 1
LOG_EVERY = 30.0  # seconds between a phase's lines in a log
SHORT = 5.0  # a phase done within this many seconds shows no bar and writes no line

_verbosity = NORMAL


def set_verbosity(level: int) -> None:
    """The command's verbosity (QUIET, NORMAL or VERBOSE), and the libraries' logs and bars to match."""
    global _verbosity
    _verbosity = level
    _libraries(level)


def verbosity() -> int:
    return _verbosity


def say(text: str) -> None:
    """A notice, `philora: text` on stderr; quiet commands keep it to themselves."""
    if _verbosity > QUIET:
        print(f"philora: {text}", file=sys.stderr)


def duration(seconds: float) -> str:
    """45s, 1m05s, 2h03m: short, and the same width of precision a person reads a clock with."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Phase:
    """Progress through `total` units of one named phase (a context manager): `update(n)` as work is done.

    `leave` keeps the bar on a terminal when done (training's); other bars go and leave one line saying how long
    the phase took. `clock` and `tick` are for tests: `tick` is how often a log's line may come between updates (a
    batch of answers can take minutes), None for only at updates."""

    def __init__(self, what: str, total: int, unit: str, *, initial: int = 0, leave: bool = False,
                 show: bool = True, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 tick: float | None = 1.0) -> None:  # fmt: skip
        self.what, self.total, self.unit, self.initial, self.done = what, total, unit, initial, initial
        self.stream = stream if stream is not None else sys.stderr
        self.clock, self.started = clock, clock()
        self.last_line = self.started
        self.postfix: dict[str, str] = {}
        self.shown = show and _verbosity > QUIET
        self.terminal = self.shown and _is_terminal(self.stream)
        self.leave = leave
        self.bar: Any = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.ticker: threading.Thread | None = None
        if self.terminal:
            from tqdm.auto import tqdm

            # delay: a bar appears only for a phase that lasts; training's shows at once (it is the run)
            self.bar = tqdm(total=total, initial=initial, desc=what, unit=unit, dynamic_ncols=True, leave=leave,
                            delay=0 if leave else SHORT, file=self.stream)  # fmt: skip
        elif self.shown and tick is not None:
            self.ticker = threading.Thread(target=self._tick, args=(tick,), daemon=True)
            self.ticker.start()

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close(finished=kind is None)

    def update(self, n: int = 1) -> None:
        with self.lock:
            self.done += n
        if self.bar is not None:
            self.bar.update(n)
        else:
            self._log_if_due()

    def set_postfix(self, **values: str) -> None:
        """Figures shown beside the count (training's loss, learning rate, tokens/s)."""
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def write(self, text: str) -> None:
        """A notice during the phase (`philora: text`), above the bar rather than through it."""
        if not self.shown:
            return
        if self.bar is not None:
            self.bar.write(f"philora: {text}", file=self.stream)
        else:
            print(f"philora: {text}", file=self.stream, flush=True)

    def close(self, finished: bool = True) -> None:
        self.stop.set()
        if self.ticker is not None:
            self.ticker.join()
        elapsed = self.clock() - self.started
        if self.bar is not None:
            self.bar.close()
        if not self.shown or not finished or elapsed < SHORT or (self.terminal and self.leave):
            return
        self._line(f"{self.what}: {self.done - self.initial:,} {self.unit}s in {duration(elapsed)}")

    def status(self) -> str:
        """`24/40 prompts, 1m05s, about 45s left`: done of total, time so far, and what is left at this pace."""
        with self.lock:
            done = self.done
        elapsed = self.clock() - self.started
        text = f"{done:,}/{self.total:,} {self.unit}s, {duration(elapsed)}"
        if done > self.initial and done < self.total:
            text += f", about {duration(elapsed / (done - self.initial) * (self.total - done))} left"
        if self.postfix:
            text += " (" + ", ".join(f"{k} {v}" for k, v in self.postfix.items()) + ")"
        return text

    def _log_if_due(self) -> None:
        if not self.shown or self.terminal:
            return
        with self.lock:
            now = self.clock()
            if now - self.last_line < LOG_EVERY:
                return
            self.last_line = now
        self._line(f"{self.what}: {self.status()}")

    def _tick(self, every: float) -> None:
        while not self.stop.wait(every):
            self._log_if_due()

    def _line(self, text: str) -> None:
        print(f"philora: {text}", file=self.stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or stand-in stream
        return False


def _libraries(level: int) -> None:
    """transformers' and peft's logs and the loading bars (Loading weights, downloads) per the verbosity. A library
    not imported yet is only imported here when the verbosity differs from its default: `philora config` stays
    fast."""
    if level == NORMAL and "transformers" not in sys.modules:
        return
    import logging

    import transformers
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if level == QUIET:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        disable_progress_bars()
    else:
        transformers.logging.enable_progress_bar()
        enable_progress_bars()
        if level == VERBOSE:
            transformers.logging.set_verbosity_info()
        elif not os.environ.get("TRANSFORMERS_VERBOSITY"):  # back to its default after a quiet or verbose command
            transformers.logging.set_verbosity_warning()
    for name in ("peft", "accelerate"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO if level == VERBOSE else logging.NOTSET if level == NORMAL else logging.ERROR)
        for handler in [h for h in logger.handlers if h.get_name() == "philora"]:  # a verbose command's, before
            logger.removeHandler(handler)
        if level == VERBOSE:  # INFO would otherwise stop at the root logger's WARNING
            handler = logging.StreamHandler()
            handler.set_name("philora")
            logger.addHandler(handler)
