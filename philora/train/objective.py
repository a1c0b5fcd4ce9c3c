"""What a run optimises, per `training_config.method`: the units the plan packs (samples for sft, preference
pairs for dpo and orpo), how a step's rows become batches, what a step's loss is divided by, and the loss module.

Every loss module returns a sum over the step's units (trained tokens, or pairs) and the loop divides it by the
step's count over all processes, so a unit weighs the same however the step is split into micro-batches or
processes. For dpo, the reference log-probabilities of every pair are computed once, before the first step, with
the model as training starts (the base, or base + model.adapter) and dropout off; they are kept in the run dir,
so a resumed run reads the numbers the first run computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from philora.data import PreparedData, Sample
from philora.data.batching import Row, collate, row_width
from philora.model.loss import TokenLoss
from philora.model.preference import STATS, PairBatches, PreferenceLoss

Batch = dict[str, torch.Tensor]


@dataclass
class Step:
    """One optimizer step's work: its micro-batches (each flagged False when it is a lent row that must add
    nothing, see Plan.mine), the count its summed loss is divided by, and its token counts."""

    batches: list[tuple[Batch, bool]]
    units: int  # trained tokens (sft) or pairs (dpo, orpo), over every process
    tokens: int
    trained: int


class Objective:
    """sft: every sample is a unit, weighed by its trained tokens."""

    stats: tuple[str, ...] = ()

    def __init__(self, samples: list[Sample], pad_id: int, flat: bool = False) -> None:
        # flat: each micro-batch is one row of its rows' samples laid end to end, without padding
        self.samples, self.pad_id, self.flat = samples, pad_id, flat

    @property
    def lengths(self) -> list[int]:
        return [len(s.input_ids) for s in self.samples]

    def loss(self, model: Any, tc: Any) -> torch.nn.Module:
        return TokenLoss(model)

    def step(self, step_rows: list[list[Row]], plan: Any) -> Step:
        trained = sum(self.samples[i].trained for rows in step_rows for row in rows for i in row)
        tokens = sum(len(self.samples[i].input_ids) for rows in step_rows for row in rows for i in row)
        batches = [(collate(self.samples, self.rows(plan.mine(rows)), self.pad_id), plan.owns(rows))
                   for rows in step_rows]  # fmt: skip
        return Step(batches, trained, tokens, trained)

    def rows(self, rows: list[Row]) -> list[Row]:
        return [[i for row in rows for i in row]] if self.flat else rows


class PairObjective(PairBatches, Objective):
    """dpo and orpo: a unit is a (chosen, rejected) pair; both sides go into the same row."""

    stats = STATS

    def __init__(self, pairs: list[tuple[Sample, Sample]], pad_id: int, width: int) -> None:
        PairBatches.__init__(self, pairs, pad_id, width)
        self.samples = self.sides

    def loss(self, model: Any, tc: Any) -> torch.nn.Module:
        return PreferenceLoss(model, tc.method, tc.beta, tc.loss_type, tc.loss_weights)

    def step(self, step_rows: list[list[Row]], plan: Any) -> Step:
        every = [k for rows in step_rows for row in rows for k in row]
        trained = sum(c.trained + r.trained for c, r in (self.pairs[k] for k in every))
        tokens = sum(self.lengths[k] for k in every)
        scale = self.nll_scale(every)
        batches = [({**self.batch(plan.mine(rows)), "nll_scale": scale}, plan.owns(rows)) for rows in step_rows]
        return Step(batches, len(every), tokens, trained)


def make_objective(prepared: PreparedData, method: str, max_length: int, split: str = "train",
                   flat: bool = False) -> Objective:  # fmt: skip
    """The objective over the train (or eval) split; dpo's reference log-probabilities are added later. `flat`:
    sft micro-batches as one row without padding (for attention that takes the samples' boundaries)."""
    pad_id = prepared.encoder.tokenizer.pad_token_id
    part = prepared.train if split == "train" else prepared.eval
    assert part is not None
    if method == "sft":
        return Objective(part.samples, pad_id, flat)
    return PairObjective(part.pairs, pad_id, row_width(method, max_length))


def reference_logprobs(loss_fn: PreferenceLoss, objective: PairObjective, batch_size: int, accelerator: Any,
                       indices: list[int] | None = None) -> np.ndarray:  # fmt: skip
    """(pairs, 2) summed log-probabilities of the chosen and rejected answers under the model as it is now, in
    eval mode (no dropout), in the run's arithmetic, for the pairs at `indices` (default all; the others NaN).
    Each process computes a share; every process gets all of them."""
    from accelerate.utils import gather_object

    indices = list(range(len(objective.pairs))) if indices is None else indices
    mine = indices[accelerator.process_index :: accelerator.num_processes]
    was_training = loss_fn.training
    loss_fn.eval()
    with accelerator.autocast():
        values = objective.sequence_logprobs(loss_fn, batch_size, mine)
    loss_fn.train(was_training)
    found = [(k, *row) for k, row in zip(mine, values.tolist(), strict=True)]
    every = gather_object(found) if accelerator.num_processes > 1 else found
    table = np.full((len(objective.pairs), 2), np.nan, dtype=np.float64)
    for k, chosen, rejected in every:
        table[k] = (chosen, rejected)
    return table


def save_reference(path: Path, table: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, table)
    tmp.replace(path)
