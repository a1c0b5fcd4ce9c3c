"""loralib's two helpers: freeze all but LoRA (and chosen biases), and the state dict of just those tensors."""

from __future__ import annotations

import torch
from torch import nn

from philora.lora.layers import LoRALayer

BIAS_MODES = ("none", "all", "lora_only")


def _check(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {', '.join(BIAS_MODES)}, got {bias!r}")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Only parameters named lora_* train; plus every bias (`all`) or the biases of LoRA layers (`lora_only`)."""
    _check(bias)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    if bias == "all":
        for name, p in model.named_parameters():
            if "bias" in name:
                p.requires_grad = True
    elif bias == "lora_only":
        for module in model.modules():
            if isinstance(module, LoRALayer) and getattr(module, "bias", None) is not None:
                module.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The LoRA tensors (and biases, per `bias`) of `model.state_dict()`, keys unchanged: load with strict=False."""
    _check(bias)
    full = model.state_dict()
    if bias == "none":
        return {k: v for k, v in full.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in full.items() if "lora_" in k or "bias" in k}
    kept = {}
    for k, v in full.items():
        if "lora_" in k:
            kept[k] = v
            owner_bias = k.split("lora_")[0] + "bias"
            if owner_bias in full:
                kept[owner_bias] = full[owner_bias]
    return kept
