"""Rows and batches: best-fit packing of samples, and tensors with per-sample position ids.

A batch carries `position_ids` that restart at 0 for every sample and no attention mask. transformers reads
restarting position ids as packed sequences and builds a block-diagonal causal mask (sdpa/eager) or varlen
calls (flash-attention), so no token attends across samples. Padding is one more "sample" of pad tokens with
its own positions and no labels, so a padded batch needs no attention mask either.

Long-context Phi-3 models (longrope: Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini) scale RoPE with one of two factor
sets, chosen per forward pass from the largest position id: past `original_max_position_embeddings` every sample
in the batch gets the long factors. A short sample that shares a batch with a long one would be trained on
factors it never sees at inference, so samples longer than that boundary (`long_after`) are packed and batched
apart from the others, and padding never reaches a position the batch's samples do not have.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from philora.data.render import IGNORE, Sample

Row = list[int]  # indices of the samples packed into one row


def row_width(method: str, max_length: int) -> int:
    """The tokens a packed row holds: max_length, or twice it for a preference pair, whose two sides share a row."""
    return max_length * (1 if method == "sft" else 2)


def pack(lengths: Sequence[int], max_length: int, long_after: int | None = None) -> list[Row]:
    """Best-fit decreasing: each sample, longest first, goes into the fullest row it still fits in. With
    `long_after`, samples longer than it share rows only with each other."""
    if long_after is not None:
        return [row for group in length_groups(lengths, long_after) for row in pack_some(lengths, group, max_length)]
    return pack_some(lengths, range(len(lengths)), max_length)


def length_groups(lengths: Sequence[int], long_after: int | None) -> list[list[int]]:
    """Sample indices up to `long_after` tokens, then those past it (non-empty groups only)."""
    if long_after is None:
        return [list(range(len(lengths)))]
    short = [i for i, n in enumerate(lengths) if n <= long_after]
    long = [i for i, n in enumerate(lengths) if n > long_after]
    return [g for g in (short, long) if g]


def pack_some(lengths: Sequence[int], indices: Sequence[int], max_length: int) -> list[Row]:
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    rows: list[Row] = []
    free: list[tuple[int, int]] = []  # (space left, row index), kept sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            space, r = free.pop(at)
        else:
            space, r = max_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - lengths[i] > 0:
            bisect.insort(free, (space - lengths[i], r))
    return rows


def one_per_row(n: int) -> list[Row]:
    return [[i] for i in range(n)]


def collate(
    samples: Sequence[Sample], rows: Sequence[Row], pad_id: int, numbered: bool = False
) -> dict[str, torch.Tensor]:
    """Tensors for a batch of rows, right-padded to the longest row. Padding positions count up to the longest
    sample's length and restart, so the batch's largest position is a real sample's (see longrope above).
    `numbered` adds `sequence`: the samples numbered in row order, per position (0 on padding)."""
    width = max(sum(len(samples[i].input_ids) for i in row) for row in rows)
    longest = max(len(samples[i].input_ids) for row in rows for i in row)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    positions = np.empty((len(rows), width), dtype=np.int64)
    sequence = np.zeros((len(rows), width), dtype=np.int64)
    number = 0
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(samples[i].input_ids)
            ids[r, at : at + n] = samples[i].input_ids
            labels[r, at : at + n] = samples[i].labels
            positions[r, at : at + n] = np.arange(n)
            sequence[r, at : at + n] = number
            at, number = at + n, number + 1
        positions[r, at:] = np.arange(width - at) % longest
    batch = {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
    }
    if numbered:
        batch["sequence"] = torch.from_numpy(sequence)
    return batch
