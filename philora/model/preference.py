"""Preference objectives on (chosen, rejected) pairs: DPO against frozen reference log-probabilities, and ORPO.

A batch holds pairs packed like any sample (positions restart per sequence, so nothing attends across them) and
a `sequence` tensor numbering the sequences of the batch: pair k's chosen answer is sequence 2k, its rejected one
2k + 1. A sequence's log-probability is the sum over its scored tokens (the final answer and its end-of-turn
token), as TRL's DPOTrainer sums it; ORPO, like TRL's ORPOTrainer, uses the per-token average.

- DPO (Rafailov et al. 2023), with TRL's names: the reward of an answer is beta * (log pi - log pi_ref); the loss
  is -logsigmoid(beta * margin) (sigmoid), relu(1 - beta * margin) (hinge), or IPO's squared distance of the
  per-token-averaged margin from 1 / (2 beta) (ipo); sft adds the chosen answers' NLL, and a list of types is
  summed with `loss_weights` ([sigmoid, sft] is RPO). The reference log-probabilities are computed once, before
  training, and passed in with the batch.
- ORPO (Hong et al. 2024): NLL of the chosen answers plus beta (the paper's lambda) times -logsigmoid of the log
  odds ratio of chosen over rejected. The NLL is on the chosen answer's tokens, as philora's SFT loss is; TRL's
  ORPOTrainer also counts the prompt's tokens in it.

`forward` returns the batch's summed loss in units of pairs (the loop divides by the step's pair count) and sums
of the logged statistics. An NLL term (ORPO's, dpo's sft) is a per-token mean over the whole step, so the
batch brings `nll_scale`, the step's pairs over its chosen tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from philora.data.batching import Row, collate, pack
from philora.data.render import Sample
from philora.model.loss import TokenLoss

METHODS = ("dpo", "orpo")
# logged per step as means over pairs, under TRL's names
STATS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class PreferenceLoss(TokenLoss):
    """Wraps a causal LM like `TokenLoss`; forward returns (summed loss over the batch's pairs, summed stats)."""

    def __init__(self, model: torch.nn.Module, method: str, beta: float, loss_type: str | list[str] = "sigmoid",
                 loss_weights: list[float] | None = None) -> None:  # fmt: skip
        super().__init__(model)
        self.method, self.beta = method, beta
        self.loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        self.loss_weights = list(loss_weights) if loss_weights is not None else [1.0] * len(self.loss_types)

    def sequence_logprobs(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, sequence: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probability, scored-token count) of every sequence of the batch, in sequence order."""
        logprobs, keep = self.token_logprobs(input_ids, labels, position_ids)
        owner = sequence[:, 1:][keep]
        n = int(sequence.max()) + 1
        sums = torch.zeros(n, dtype=logprobs.dtype, device=logprobs.device).index_add(0, owner, logprobs)
        return sums, torch.bincount(owner, minlength=n).to(logprobs.dtype)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        sequence: torch.Tensor,
        reference: torch.Tensor | None = None,
        nll_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sums, counts = self.sequence_logprobs(input_ids, labels, position_ids, sequence)
        chosen, rejected = sums[0::2], sums[1::2]
        nll = -chosen.sum() * (nll_scale.to(sums.dtype) if nll_scale is not None else 1.0)  # in units of pairs
        if self.method == "dpo":
            assert reference is not None, "dpo needs the reference log-probabilities"
            reference = reference.to(sums.dtype)
            chosen_ratio, rejected_ratio = chosen - reference[:, 0], rejected - reference[:, 1]
            loss = sum(
                weight * (nll if kind == "sft" else self.dpo_losses(kind, chosen_ratio, rejected_ratio, counts).sum())
                for kind, weight in zip(self.loss_types, self.loss_weights, strict=True)
            )
            rewards = (self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach())
            logged = (chosen.detach(), rejected.detach())
        else:
            chosen_mean, rejected_mean = chosen / counts[0::2], rejected / counts[1::2]
            log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
            loss = nll - self.beta * F.logsigmoid(log_odds).sum()
            rewards = (self.beta * chosen_mean.detach(), self.beta * rejected_mean.detach())
            logged = (chosen_mean.detach(), rejected_mean.detach())
        margins = rewards[0] - rewards[1]
        values = (rewards[0], rewards[1], (margins > 0).to(sums.dtype), margins, *logged)
        return loss, {name: v.sum() for name, v in zip(STATS, values, strict=True)}

    def dpo_losses(
        self, kind: str, chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """Per-pair losses of one dpo loss type."""
        margin = chosen_ratio - rejected_ratio
        if kind == "sigmoid":
            return -F.logsigmoid(self.beta * margin)
        if kind == "hinge":
            return torch.relu(1 - self.beta * margin)
        return (chosen_ratio / counts[0::2] - rejected_ratio / counts[1::2] - 1 / (2 * self.beta)) ** 2  # ipo


class PairBatches:
    """Preference pairs as batches for `PreferenceLoss`, with dpo's reference log-probabilities once known.
    Outside training (the reference pass, evaluation) pairs are packed into rows of `width` tokens, as training
    packs them, so a forward pass computes no padding."""

    def __init__(self, pairs: list[tuple[Sample, Sample]], pad_id: int, width: int,
                 reference: np.ndarray | None = None) -> None:  # fmt: skip
        self.pairs, self.pad_id, self.width, self.reference = pairs, pad_id, width, reference
        self.sides = [side for pair in pairs for side in pair]

    @property
    def lengths(self) -> list[int]:
        return [len(c.input_ids) + len(r.input_ids) for c, r in self.pairs]

    def batch(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        """Rows of pair indices as a numbered batch: pair k of the batch is sequences 2k (chosen), 2k + 1."""
        expanded = [[i for k in row for i in (2 * k, 2 * k + 1)] for row in rows]
        batch = collate(self.sides, expanded, self.pad_id, numbered=True)
        if self.reference is not None:
            batch["reference"] = torch.from_numpy(self.reference[[k for row in rows for k in row]])
        return batch

    def nll_scale(self, indices: list[int]) -> torch.Tensor:
        """ORPO's NLL weight for these pairs taken together: pairs over chosen tokens (see PreferenceLoss)."""
        chosen = sum(self.pairs[k][0].trained for k in indices)
        return torch.tensor(len(indices) / max(chosen, 1), dtype=torch.float64)

    def batches(self, indices: list[int], rows_per_batch: int) -> list[list[Row]]:
        """The pairs at `indices` packed into rows, `rows_per_batch` rows a batch."""
        lengths = self.lengths
        rows = [[indices[i] for i in row] for row in pack([lengths[k] for k in indices], self.width)]
        return [rows[at : at + rows_per_batch] for at in range(0, len(rows), rows_per_batch)]

    @torch.no_grad()
    def sequence_logprobs(self, loss: PreferenceLoss, rows_per_batch: int, indices: list[int] | None = None
                          ) -> np.ndarray:  # fmt: skip
        """(pairs, 2) summed log-probabilities of the chosen and rejected answers of the pairs at `indices` (default
        all, in that order) under `loss`'s model as it is."""
        indices = list(range(len(self.pairs))) if indices is None else indices
        device = next(loss.parameters()).device
        found: dict[int, list[float]] = {}
        for rows in self.batches(indices, rows_per_batch):
            batch = self.batch(rows)
            batch.pop("reference", None)
            sums, _ = loss.sequence_logprobs(**{k: v.to(device) for k, v in batch.items()})
            found.update(zip((k for row in rows for k in row), sums.double().cpu().view(-1, 2).tolist(), strict=True))
        return np.array([found[k] for k in indices], dtype=np.float64).reshape(len(indices), 2)

    @torch.no_grad()
    def evaluate(self, loss: torch.nn.Module, rows_per_batch: int) -> dict[str, float]:
        """The loss and the logged statistics, averaged over every pair, in eval mode."""
        was_training = loss.training
        loss.eval()
        device = next(loss.parameters()).device
        totals: dict[str, float] = {}
        scale = self.nll_scale(list(range(len(self.pairs))))  # ORPO's NLL: a token mean over all the pairs
        for rows in self.batches(list(range(len(self.pairs))), rows_per_batch):
            value, stats = loss(**{k: v.to(device) for k, v in {**self.batch(rows), "nll_scale": scale}.items()})
            for name, number in {"loss": value, **stats}.items():
                totals[name] = totals.get(name, 0.0) + float(number)
        loss.train(was_training)
        return {name: total / max(len(self.pairs), 1) for name, total in totals.items()}
