"""Rows and batches: best-fit packing of samples, and tensors with per-sample position ids.

A batch carries `position_ids` that restart at 0 for every sample and no attention mask. transformers reads
restarting position ids as packed sequences and builds a block-diagonal causal mask (sdpa/eager) or varlen
calls (flash-attention), so no token attends across samples. Padding is one more "sample" of pad tokens with
its own positions and no labels, so a padded batch needs no attention mask either.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

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
    ids, labels, positions = [], [], []
    for row in rows:
        ids.append([t for i in row for t in samples[i].input_ids])
        labels.append([t for i in row for t in samples[i].labels])
        positions.append([p for i in row for p in range(len(samples[i].input_ids))])
    width = max(map(len, ids))
    for seq_ids, seq_labels, seq_pos in zip(ids, labels, positions, strict=True):
        gap = width - len(seq_ids)
        seq_ids += [pad_id] * gap
        seq_labels += [IGNORE] * gap
        seq_pos += range(gap)
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "position_ids": torch.tensor(positions),
    }
