"""The one thread that touches the model in `philora serve`: it takes queued jobs, the oldest first with the other
waiting ones for the same adapter (up to MAX_BATCH), and generates them as one left-padded batch. The model is
switched between adapters only here, between batches, so a switch can never change an answer that is generating.
A job reports to the event loop of the request that made it, which awaits its events.
"""

from __future__ import annotations

import asyncio
import threading
import traceback
from collections import deque
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any

from philora.data.render import ChatEncoder
from philora.infer.generation import Row, generate
from philora.infer.openai_api import ApiError

MAX_BATCH = 16  # requests generated together

SHUTTING_DOWN = ApiError(503, "the server is shutting down", "server_error")


@dataclass
class Job:
    """One chat completion on its way through the worker, which reports to `events`: ("text", str) as the answer
    grows, then ("done", Completion) or ("error", ApiError)."""

    adapter: str | None  # None: the base model
    row: Row
    loop: asyncio.AbstractEventLoop  # the request's: events are put on the queue from the worker's thread
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.row.on_text = lambda text: self.report("text", text)
        self.row.cancelled = self.cancel.is_set

    def report(self, kind: str, value: Any) -> None:
        with suppress(RuntimeError):  # the server's loop has closed: nobody waits for this job any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Worker:
    """Takes batches of jobs for one adapter and generates them; the only thread that touches the model."""

    def __init__(self, model: Any, encoder: ChatEncoder, max_queue: int) -> None:
        self.model, self.encoder, self.max_queue = model, encoder, max_queue
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="philora-generate", daemon=True)

    def submit(self, job: Job) -> bool:
        """Queue the job; False when the queue is full or the worker is closing."""
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
            job.report("error", SHUTTING_DOWN)
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
                        job.report("done", result)
            except Exception:  # a bug: tell these requests, keep serving the others
                traceback.print_exc()
                for job in batch:
                    job.report("error", ApiError(500, "generation failed; see the server log", "server_error"))
            finally:
                self.running = []

    def _adapter(self, name: str | None) -> AbstractContextManager[Any]:
        if not hasattr(self.model, "disable_adapter"):  # a plain model: no adapters loaded
            return nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return nullcontext()
