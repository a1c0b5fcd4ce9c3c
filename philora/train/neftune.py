"""NEFTune (Jain et al., 2023): uniform noise added to the input embeddings while training, which the paper found
to improve instruction tuning. Each embedding vector gets noise in [-1, 1] scaled by alpha / sqrt(L * d), d the
hidden size and L the length of the sequence the token belongs to. In a packed row L is that sequence's own
length, read from the position ids where they restart at 0 (transformers and TRL take the whole row's length,
which shrinks the noise of packed sequences by the square root of the number packed together).

Hooks on the model in memory, active only in training mode: evaluation, generation and the reference pass run
in eval mode and see no noise, and nothing of it is saved with the adapter.
"""

from __future__ import annotations

from typing import Any

import torch


def attach(model: Any, alpha: float) -> list[Any]:
    """Add the noise to `model`'s input embeddings in training mode; returns the hook handles (remove() undoes)."""
    embeddings = model.get_input_embeddings()
    decoder = next((m for m in model.modules() if getattr(m, "embed_tokens", None) is embeddings), None)
    seen: dict[str, torch.Tensor | None] = {"position_ids": None}

    def remember(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["position_ids"] = kwargs.get("position_ids")

    def noisy(module: torch.nn.Module, _: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        lengths = sequence_lengths(seen["position_ids"], output.shape[:2])
        scale = alpha / torch.sqrt(lengths.to(torch.float32) * output.shape[-1])
        noise = torch.empty_like(output, dtype=torch.float32).uniform_(-1, 1) * scale.to(output.device)[..., None]
        return output + noise.to(output.dtype)

    handles = [embeddings.register_forward_hook(noisy)]
    if decoder is not None:
        handles.append(decoder.register_forward_pre_hook(remember, with_kwargs=True))
    return handles


def sequence_lengths(position_ids: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """(batch, tokens): the length of the sequence each token belongs to. Sequences start where the position ids
    restart at 0 (packed rows); without position ids of this shape, each row is one sequence."""
    batch, tokens = shape
    if position_ids is None or tuple(position_ids.shape) != (batch, tokens):
        return torch.full((batch, tokens), tokens)
    starts = position_ids == 0
    starts[:, 0] = True
    segment = starts.long().cumsum(dim=1) - 1  # each token's sequence within its row
    flat = segment + torch.arange(batch, device=segment.device)[:, None] * tokens  # unique across rows
    counts = torch.bincount(flat.flatten(), minlength=batch * tokens)
    return counts[flat]
