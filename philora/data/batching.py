"""Rows and batches: best-fit packing of samples, and tensors with per-sample position ids.

A batch carries `position_ids` that restart at 0 for every sample and no attention mask. transformers reads
restarting position ids as packed sequences and builds a block-diagonal causal mask (sdpa/eager) or varlen
calls (flash-attention), so no token attends across samples. Padding is one more "sample" of pad tokens with
its own positions and no labels, so a padded batch needs no attention mask either.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from philora.data.render import IGNORE, Sample

Row = list[int]  # indices of the samples packed into one row


def pack(lengths: Sequence[int], max_length: int) -> list[Row]:
    """Best-fit decreasing: each sample, longest first, goes into the fullest row it still fits in."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
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


def collate(samples: Sequence[Sample], rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors for a batch of rows, right-padded to the longest row."""
    width = max(sum(len(samples[i].input_ids) for i in row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    positions = np.empty((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(samples[i].input_ids)
            ids[r, at : at + n] = samples[i].input_ids
            labels[r, at : at + n] = samples[i].labels
            positions[r, at : at + n] = np.arange(n)
            at += n
        positions[r, at:] = np.arange(width - at)
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
    }
