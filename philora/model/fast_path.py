"""The training step's fast path, put on a model in one place: train.run.build installs it on the model it trains,
and the check's meta model gets the same, so the memory estimate counts what these functions keep. Each piece
runs only in training and falls back to the library's own forward otherwise."""

from __future__ import annotations

import torch

from philora.lora import fused
from philora.model import rms_norm, rotary


def install(model: torch.nn.Module) -> None:
    """Route `model`'s LoRA linear layers, RMSNorms and Phi-3 attention through their fused training functions."""
    fused.install(model)  # peft's LoRA branch in one autograd function
    rms_norm.install(model)  # RMSNorm's normalization
    rotary.install(model)  # Phi-3's rotary embedding, from the fused qkv projection
