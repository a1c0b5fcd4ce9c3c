"""The one thread that touches the model in `philora serve`: it takes queued jobs, the oldest first with the other
waiting ones for the same adapter (up to MAX_BATCH, and as many as fit the batch's token budget), and generates
them as one left-padded batch. The model is switched between adapters only here, between batches, so a switch can
never change an answer that is generating. A job reports to the event loop of the request that made it, which
awaits its events. A job whose own sampling fails is answered 500 alone; the others in its batch go on.

Memory is budgeted in tokens, not requests: a batch holds rows x (its longest prompt + the most tokens a row may
generate) positions of KV cache and activations, which must stay within `batch_tokens`; the queue holds at most
QUEUED_BATCHES batches' worth of tokens (each job counted as its prompt + the tokens it may generate).
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
from philora.infer.generation import Completion, Row, context_length, generate, generation_limit
from philora.infer.openai_api import ApiError

MAX_BATCH = 16  # requests generated together
# The default budget of a batch, in positions (rows x padded length): 16,384 is 16 requests of 1,024 tokens, and
# ~6 GB of KV cache on Phi-3-mini in bf16 (~380 MB on the embedded model). A model whose context is longer gets
# its context, so that one request of any length that fits it can run.
BATCH_TOKENS = 16384
QUEUED_BATCHES = 4  # the queue holds this many batches' worth of tokens; more is answered 503

SHUTTING_DOWN = ApiError(503, "the server is shutting down", "server_error")
GENERATION_FAILED = ApiError(500, "generation failed; see the server log", "server_error")


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

    def __init__(self, model: Any, encoder: ChatEncoder, max_queue: int, batch_tokens: int | None = None) -> None:
        self.model, self.encoder, self.max_queue = model, encoder, max_queue
        self.context = context_length(model) or 1 << 62
        self.batch_tokens = batch_tokens or max(BATCH_TOKENS, context_length(model) or 0)
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.queued_tokens = 0  # the spans of the waiting jobs
        self.running: list[Job] = []
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="philora-generate", daemon=True)

    def span(self, row: Row) -> int:
        """The positions `row` may take: its prompt and the most tokens it may generate."""
        return len(row.prompt_ids) + max(0, generation_limit(row, self.context))

    def cost(self, rows: list[Row]) -> int:
        """The positions a batch of `rows` takes at its longest: every row is padded to the longest prompt, and
        the batch runs until its longest answer is done."""
        longest = max(len(r.prompt_ids) for r in rows)
        return len(rows) * (longest + max(generation_limit(r, self.context) for r in rows))

    def submit(self, job: Job) -> bool:
        """Queue the job; False when the queue is full (in requests or tokens) or the worker is closing."""
        span = self.span(job.row)
        with self.cond:
            full = self.queued_tokens + span > QUEUED_BATCHES * self.batch_tokens
            if self.closed or len(self.waiting) >= self.max_queue or full:
                return False
            self.waiting.append(job)
            self.queued_tokens += span
            self.cond.notify()
            return True

    def close(self) -> None:
        """Take no new jobs; return once the queued and running ones are answered."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()

    def cancel(self) -> None:
        """Take no new jobs, answer the queued ones 503 and stop the running ones where they are."""
        with self.cond:
            dropped = list(self.waiting)
            self.waiting.clear()
            self.queued_tokens, self.closed = 0, True
            self.cond.notify()
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
            batch = [self.waiting.popleft()]  # the oldest fits alone: app.py refuses a request that does not
            for job in list(self.waiting):
                if len(batch) == MAX_BATCH:
                    break
                if job.adapter == batch[0].adapter and self.cost([j.row for j in [*batch, job]]) <= self.batch_tokens:
                    batch.append(job)
                    self.waiting.remove(job)
            self.queued_tokens -= sum(self.span(j.row) for j in batch)
            self.running = [j for j in batch if not j.cancel.is_set()]  # the others' clients left
            return self.running

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                if batch:
                    with self._adapter(batch[0].adapter):
                        results = generate(self.model, self.encoder, [j.row for j in batch], isolate=True)
                    for job, result in zip(batch, results, strict=True):
                        self._answer(job, result)
            except Exception:  # a bug: tell these requests, keep serving the others
                traceback.print_exc()
                for job in batch:
                    job.report("error", GENERATION_FAILED)
            finally:
                self.running = []

    @staticmethod
    def _answer(job: Job, result: Completion) -> None:
        if result.error is None:
            job.report("done", result)
            return
        traceback.print_exception(result.error)  # this request's own sampling failed: it alone is answered 500
        job.report("error", GENERATION_FAILED)

    def _adapter(self, name: str | None) -> AbstractContextManager[Any]:
        if not hasattr(self.model, "disable_adapter"):  # a plain model: no adapters loaded
            return nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return nullcontext()
