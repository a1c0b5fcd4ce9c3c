"""Which rows make up each optimizer step: the data order of a run, a function of the step index alone."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from philora.config import TrainingSection
from philora.data.batching import Row, length_groups, one_per_row, pack


@dataclass
class Plan:
    """How the rows become optimizer steps. Micro-batch k of the whole run is batch k % per_epoch of epoch
    k // per_epoch, each epoch in a seeded order, so a step's data follows from its index alone (exact resume).

    With several processes a micro-batch holds batch_size rows per process and process `rank` takes every
    world-th row of it, so N processes see the same global batches as one process with N times the batch.

    `groups` splits the rows into sets that never share a micro-batch (short and long samples of a longrope
    model, see data.batching): each group is shuffled and cut into micro-batches, and those are shuffled."""

    rows: list[Row]
    batch_size: int
    accumulation: int
    total_steps: int
    seed: int
    world: int = 1
    rank: int = 0
    groups: list[list[int]] | None = None  # row indices per group; None = one group

    @property
    def width(self) -> int:
        return self.batch_size * self.world

    @property
    def per_epoch(self) -> int:
        return sum(math.ceil(len(g) / self.width) for g in self.groups or [self.rows])

    def micro_batches(self, step: int) -> list[list[Row]]:
        """The global micro-batches of optimizer step `step` (from 0), every process's rows."""
        out = []
        for k in range(step * self.accumulation, (step + 1) * self.accumulation):
            epoch, index = divmod(k, self.per_epoch)
            out.append([self.rows[i] for i in self.epoch_batch(epoch, index)])
        return out

    def epoch_batch(self, epoch: int, index: int) -> list[int]:
        """Row indices of micro-batch `index` of `epoch`, in the epoch's seeded order."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.groups is None or len(self.groups) == 1:
            order = torch.randperm(len(self.rows), generator=generator)
            return order[index * self.width : (index + 1) * self.width].tolist()
        batches = []
        for group in self.groups:
            shuffled = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            batches += [shuffled[at : at + self.width] for at in range(0, len(shuffled), self.width)]
        return batches[int(torch.randperm(len(batches), generator=generator)[index])]

    def mine(self, rows: list[Row]) -> list[Row]:
        """This process's share of a global micro-batch (never empty: a short last batch lends its first row to
        the processes it cannot feed, which then contribute no loss; see `loop`)."""
        return rows[self.rank :: self.world] or rows[:1]

    def owns(self, rows: list[Row]) -> bool:
        return bool(rows[self.rank :: self.world])

    def epochs_done(self, steps: int) -> float:
        return steps * self.accumulation / self.per_epoch

    def ends_epoch(self, steps: int) -> bool:
        """Whether optimizer step number `steps` (from 1) consumed the last micro-batch of an epoch."""
        return steps * self.accumulation // self.per_epoch > (steps - 1) * self.accumulation // self.per_epoch


def make_plan(lengths: list[int], tc: TrainingSection, max_length: int, packing: bool, world: int = 1,
              rank: int = 0, long_after: int | None = None) -> Plan:  # fmt: skip
    """The run's plan over units of these token lengths (samples, or preference pairs); `long_after` is a
    longrope model's original context, whose two sides never share a batch."""
    rows = pack(lengths, max_length, long_after) if packing else one_per_row(len(lengths))
    longest = [max(lengths[i] for i in row) for row in rows]
    groups = length_groups(longest, long_after) if long_after is not None else None
    plan = Plan(rows, tc.per_device_train_batch_size, tc.gradient_accumulation_steps, 0, tc.seed, world, rank,
                groups)  # fmt: skip
    per_epoch_steps = math.ceil(plan.per_epoch / tc.gradient_accumulation_steps)
    plan.total_steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.num_train_epochs * per_epoch_steps)
    return plan
