"""From conversations to samples that fit max_length: batched, in parallel processes, with a length policy.

An overlong conversation is handled by `data.overlong`:
- drop: left out whole;
- truncate: cut after the last trained answer that still fits (inside the first answer when none does);
- split: cut at user turns into several conversations that each fit, the system prompt repeated in each.
Every row's outcome is kept (whole, truncated, split, dropped, or the problem that rejected it) so that the
report can count them; nothing is left out silently.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from philora.data.formats import Conversation, RowProblem
from philora.data.render import IGNORE, ChatEncoder, NothingToTrain, Sample, trained_turns
from philora.progress import Phase

FITS = ("whole", "truncated", "split", "dropped", "rejected", "untrained")
CHUNK = 256  # conversations per batch of renders
PARALLEL_FROM = 2000  # fewer conversations than this are not worth starting processes for


@dataclass
class Outcome:
    samples: list[Sample] = field(default_factory=list)
    fit: str = "whole"  # one of FITS
    problem: str | None = None  # why the row was rejected


def encode_all(
    conversations: Sequence[Conversation],
    encoder: ChatEncoder,
    settings: tuple[str, int, str, bool],
    num_proc: int | None,
    what: str = "tokenising",
) -> list[Outcome]:
    """Outcomes in input order; `settings` is (train_on, max_length, overlong, train_on_reasoning). Progress is
    shown as the phase `what`, a chunk of conversations at a time."""
    chunks = [conversations[i : i + CHUNK] for i in range(0, len(conversations), CHUNK)]
    processes = worker_count(num_proc, len(conversations))
    global _WORK
    _WORK = (encoder, settings)
    parts: list[list[Outcome]] = []
    try:
        if processes > 1:
            # fork shares the loaded tokenizer with the workers; each tokenizes on one thread. The workers are forked
            # before the progress starts its threads (a fork copies no thread but may copy a lock one holds). imap,
            # not map: chunks come back in order as they are done, so the progress moves.
            pool = multiprocessing.get_context("fork").Pool
            with (
                _environment("TOKENIZERS_PARALLELISM", "false"),
                pool(processes) as workers,
                Phase(what, len(conversations), "conversation") as phase,
            ):
                for part in workers.imap(_encode_chunk, chunks):
                    parts.append(part)
                    phase.update(len(part))
        else:
            with Phase(what, len(conversations), "conversation") as phase:
                for chunk in chunks:
                    parts.append(_encode_chunk(chunk))
                    phase.update(len(chunk))
    finally:
        _WORK = None
    return [outcome for part in parts for outcome in part]


def worker_count(num_proc: int | None, n: int) -> int:
    """Processes to encode n conversations with: data.num_proc, else every core for large data. Workers are
    forked (they share the loaded tokenizer); where the OS cannot fork, encoding stays in this process."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    if num_proc is not None:
        return num_proc
    if n < PARALLEL_FROM:
        return 1
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)


_WORK: tuple[ChatEncoder, tuple[str, int, str, bool]] | None = None


def _encode_chunk(chunk: Sequence[Conversation]) -> list[Outcome]:
    assert _WORK is not None
    encoder, (train_on, max_length, overlong, reasoning) = _WORK
    # A row whose template re-renders earlier turns (dropping their reasoning) is one conversation per answer.
    views = [encoder.as_rendered(row, train_on) if row.rejected is None else [] for row in chunk]
    singles = iter(encoder.encode_many([view for row in views for view in row], train_on, reasoning))
    # A pair's two sides are scored on their last answer alone, whatever train_on says.
    sides = [Conversation(row.source, messages=side) for row in chunk if row.rejected is not None for side in row.sides]
    paired = iter(encoder.encode_many(sides, "last_assistant", reasoning))
    outcomes = []
    for row, row_views in zip(chunk, views, strict=True):
        try:
            if row.rejected is not None:
                outcomes.append(fit_pair((next(paired), next(paired)), max_length, overlong))
                continue
            fits = []
            for view, result in [(view, next(singles)) for view in row_views]:
                if isinstance(result, RowProblem):
                    raise result
                fits.append(fit_length(view, result, encoder, (train_on, max_length, overlong, reasoning)))
            outcomes.append(_joined(fits))
        except RowProblem as e:
            outcomes.append(Outcome(fit="untrained" if isinstance(e, NothingToTrain) else "rejected", problem=str(e)))
    return outcomes


def _joined(fits: list[Outcome]) -> Outcome:
    """One row's outcome from those of its views: their samples, and the worst fit among them."""
    if len(fits) == 1:
        return fits[0]
    worst = max((f.fit for f in fits), key=("whole", "split", "truncated", "dropped").index)
    samples = [s for f in fits for s in f.samples]
    return Outcome(samples, worst if samples else "dropped")


def fit_pair(sides: tuple[Sample | RowProblem, Sample | RowProblem], max_length: int, overlong: str) -> Outcome:
    """A preference pair's two samples (chosen, rejected), each cut to max_length unless overlong is drop; the
    pair is dropped whole when either side cannot keep a trained token."""
    for name, side in zip(("chosen", "rejected"), sides, strict=True):
        if isinstance(side, RowProblem):
            raise type(side)(f"{name}: {side}")
    samples = [s for s in sides if isinstance(s, Sample)]
    if all(len(s.input_ids) <= max_length for s in samples):
        return Outcome(samples)
    cut = [truncate(s, max_length) if len(s.input_ids) > max_length else s for s in samples]
    if overlong == "drop" or any(c is None for c in cut):
        return Outcome(fit="dropped")
    return Outcome([c for c in cut if c is not None], "truncated")


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def fit_length(
    row: Conversation, sample: Sample, encoder: ChatEncoder, settings: tuple[str, int, str, bool]
) -> Outcome:
    _, max_length, overlong, _ = settings
    if len(sample.input_ids) <= max_length:
        return Outcome([sample])
    if overlong == "drop":
        return Outcome(fit="dropped")
    if overlong == "split":
        pieces = _split(row, sample, encoder, settings)
        return Outcome(pieces, "split" if len(pieces) > 1 else "truncated" if pieces else "dropped")
    cut = truncate(sample, max_length)
    return Outcome([cut], "truncated") if cut else Outcome(fit="dropped")


def truncate(sample: Sample, max_length: int) -> Sample | None:
    """The sample cut after its last answer that fits, else at max_length; None when nothing trained is left."""
    cut = max((end for end in sample.turn_ends if end <= max_length), default=max_length)
    labels = sample.labels[:cut]
    if not np.any(labels != IGNORE):
        return None
    return Sample(sample.input_ids[:cut].copy(), labels.copy(), [e for e in sample.turn_ends if e <= cut])


def _split(
    row: Conversation, sample: Sample, encoder: ChatEncoder, settings: tuple[str, int, str, bool]
) -> list[Sample]:
    train_on, max_length, _, reasoning = settings
    if row.messages is None:  # text: consecutive windows of max_length tokens
        starts = range(0, len(sample.input_ids), max_length)
        return [
            Sample(sample.input_ids[s : s + max_length].copy(), sample.labels[s : s + max_length].copy())
            for s in starts
        ]
    trained = set(trained_turns(row.messages, train_on))
    messages = [{**m, "train": i in trained} if m["role"] == "assistant" else m for i, m in enumerate(row.messages)]
    system = messages[:1] if messages[0]["role"] == "system" else []
    groups: list[list[dict[str, Any]]] = []
    for m in messages[len(system) :]:
        if m["role"] == "user" or not groups:
            groups.append([])
        groups[-1].append(m)
    chunks: list[list[dict[str, Any]]] = []
    for group in groups:
        if chunks and len(encoder.ids(system + chunks[-1] + group, tools=row.tools)) <= max_length:
            chunks[-1] += group
        else:
            chunks.append(list(group))
    pieces = []
    for chunk in chunks:
        if train_on != "all" and not any(m.get("train") for m in chunk):
            continue
        piece = encoder.encode(system + chunk, "all" if train_on == "all" else "assistant", row.tools, reasoning)
        piece = piece if len(piece.input_ids) <= max_length else truncate(piece, max_length)
        if piece is not None:
            pieces.append(piece)
    return pieces
