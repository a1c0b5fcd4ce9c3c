"""The training objective: summed cross-entropy over supervised tokens, the LM head run only where needed.

A causal LM's forward computes logits for every position, a (tokens x vocabulary) tensor that dominates memory
and costs a large share of the FLOPs on small models. Only positions whose next token is trained need logits,
so the loss runs the decoder, picks those hidden states, and applies the LM head to them alone.

Even those logits are never held whole: `ChunkedTokenLogprobs` runs the head and the log-softmax CHUNK
positions at a time and computes each position's gradient with respect to its hidden state right away (one-hot
minus softmax, times the head's weight). Whatever the loss does with the log-probabilities (a sum for
cross-entropy, per-sequence weights for DPO), backward then only scales what forward stored per position, so
peak memory holds one chunk's logits instead of every trained position's logits, softmax and gradient, at no
extra compute. A head that is itself trained (`modules_to_save: [lm_head]`) takes the plain path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from philora.data.render import IGNORE
from philora.model import cpu_matmul
from philora.model.packed_attention import varlen_arguments

CHUNK = 256  # positions per head + cross-entropy chunk: (CHUNK x vocabulary) floats live at a time


class ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[targets] per position, without materialising all logits; gradient for
    hidden only. The loss of `TokenLoss` is minus their sum; preference losses weigh them per sequence."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        precision = torch.promote_types(hidden.dtype, torch.float32)  # the softmax in fp32 at least
        out = torch.empty(hidden.shape[0], dtype=precision, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # Two buffers for every chunk, written in place: fresh (tokens x vocabulary) tensors per chunk would each
        # be new pages from the OS (at 1024 x 49k in fp32, page faults took longer than the head's matmul).
        rows = min(CHUNK, hidden.shape[0])
        products = torch.empty(rows, weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        logits = products if precision == hidden.dtype else torch.empty_like(products, dtype=precision)
        for start in range(0, hidden.shape[0], CHUNK):
            h, t = hidden[start : start + CHUNK], targets[start : start + CHUNK]
            n = len(t)
            cpu_matmul.linear_into(products[:n], h, weight)
            z = logits[:n]
            if logits is not products:  # the softmax's precision is wider than the matmul's
                z.copy_(products[:n])
            picked = z.gather(1, t[:, None]).squeeze(1)
            top = z.amax(dim=-1, keepdim=True)
            probs = z.sub_(top).exp_()  # the softmax's numerator, in place
            total = probs.sum(dim=-1, keepdim=True)
            out[start : start + n] = picked - (top + total.log()).squeeze(1)
            if grad is not None:  # minus d logp / d logits = softmax - one_hot
                probs.div_(total)
                probs[torch.arange(n, device=t.device), t] -= 1
                narrow = probs if probs.dtype == weight.dtype else products[:n].copy_(probs)
                cpu_matmul.linear_into(grad[start : start + n], narrow, weight.T)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None
        return grad * -grad_output.to(grad.dtype)[:, None], None, None


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
    """Wraps a causal LM (or a peft model of one); forward returns (summed loss, statistics to log: none here).

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
        # A plain frozen linear head (no bias, not trained, not wrapped by peft) can be chunked.
        self.chunked = (
            type(self.head) is torch.nn.Linear and self.head.bias is None and not self.head.weight.requires_grad
        )

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logprobs, _ = self.token_logprobs(input_ids, labels, position_ids)
        return -logprobs.sum(), {}

    def token_logprobs(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probability of each trained next token, in at least fp32; the (batch, length - 1) mask of
        where they are)."""
        targets = labels[:, 1:]
        keep = targets != IGNORE
        # In training, a flat row of packed samples tells attention where they start (model.packed_attention);
        # evaluation keeps the arithmetic of a model loaded for inference, so `philora eval` gives its numbers.
        varlen = varlen_arguments(position_ids) if self.training and input_ids.shape[0] == 1 else {}
        if not self.selective:
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **varlen).logits
            return _gathered(logits[:, :-1][keep], targets[keep]), keep
        hidden = self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False, **varlen)[0]
        hidden = hidden[:, :-1][keep]
        if self.chunked:
            return ChunkedTokenLogprobs.apply(hidden, self.head.weight, targets[keep]), keep
        return _gathered(self.head(hidden), targets[keep]), keep


def _gathered(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits.float(), targets, reduction="none")
