"""The training objective: summed cross-entropy over supervised tokens, the LM head run only where needed.

A causal LM's forward computes logits for every position, a (tokens x vocabulary) tensor that dominates memory
and costs a large share of the FLOPs on small models. Only positions whose next token is trained need logits,
so the loss runs the decoder, picks those hidden states, and applies the LM head to them alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from philora.data.render import IGNORE


def _selective_head_ok(model: Any) -> bool:
    """Models that post-process logits (soft-capping, scaling) are run whole instead."""
    config = model.config
    return (
        hasattr(model, "get_decoder")
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) is None
        and getattr(config, "logits_scaling", None) is None
    )


class TokenLoss(torch.nn.Module):
    """Wraps a causal LM (or a peft model of one); forward returns (summed loss, number of trained tokens).

    Summing rather than averaging lets the loop divide by the token count of a whole optimizer step, so every
    trained token weighs the same however the step is split into micro-batches.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.selective = _selective_head_ok(base)
        self.decoder = base.get_decoder() if self.selective else None
        self.head = base.get_output_embeddings() if self.selective else None

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        targets = labels[:, 1:]
        keep = targets != IGNORE
        if self.selective:
            hidden = self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
            logits = self.head(hidden[:, :-1][keep])
        else:
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            logits = logits[:, :-1][keep]
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss, keep.sum()
