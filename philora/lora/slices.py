"""LoRA on some slices of a fused projection (`qkv_proj:q,v`), trained and saved as ordinary peft LoRA.

Phi-3 holds q, k and v in one `qkv_proj` (and gate, up in one `gate_up_proj`); peft can only adapt a module
whole. A LoRA on slices q and v with rank r each is the same thing as one LoRA on `qkv_proj` of rank 2r whose A
stacks the two slices' A and whose B holds each slice's B in that slice's rows and its own r columns, zeros
elsewhere. philora builds exactly that: peft LoRA with rank 2r and alpha 2·alpha on the module (so the scale
alpha/r per slice is kept), B's off-block entries zero and their gradients masked to zero, so they stay zero
under AdamW (weight decay included). The k rows of the update are exactly zero, so the k output is exactly the
base model's. What is saved is a standard PEFT adapter that plain `PeftModel.from_pretrained` loads as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from philora.errors import UserError
from philora.model.layout import SLICES, part_rows


@dataclass
class SliceSpec:
    module: str  # qkv_proj or gate_up_proj
    chosen: list[str]  # slices that get LoRA, in the module's order


def parse(target: str) -> SliceSpec | None:
    """`qkv_proj:q,v` -> SliceSpec; a plain module name -> None."""
    if ":" not in target:
        return None
    module, _, names = target.partition(":")
    known = SLICES.get(module)
    if known is None:
        raise UserError(
            f"peft_config.target_modules: {target!r}: slices are for fused modules "
            f"({', '.join(SLICES)}), not {module!r}"
        )
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        raise UserError(
            f"peft_config.target_modules: {target!r}: {module} has slices {', '.join(known)}; "
            f"name one or more, e.g. {module}:{','.join(known[::2])}"
        )
    return SliceSpec(module, [n for n in known if n in chosen])


def slice_sizes(config: Any, module: str) -> dict[str, int]:
    """Output rows of each slice of a fused module, from the model config (grouped-query attention aware)."""
    return {part.removesuffix("_proj"): rows for part, rows in part_rows(config)[module].items()}


def patterns(specs: list[SliceSpec], r: int, alpha: float, rslora: bool) -> tuple[dict[str, int], dict[str, float]]:
    """peft rank_pattern and alpha_pattern that give each chosen slice rank r and scale alpha/r."""
    ranks, alphas = {}, {}
    for spec in specs:
        k = len(spec.chosen)
        ranks[spec.module] = k * r
        alphas[spec.module] = alpha * (math.sqrt(k) if rslora else k)
    return ranks, alphas


def restrict(peft_model: Any, specs: list[SliceSpec], r: int) -> int:
    """Zero B outside the chosen slices' blocks and keep it zero; returns how many entries are held at zero."""
    from peft.tuners.lora import LoraLayer

    held = 0
    config = peft_model.get_base_model().config
    for spec in specs:
        sizes = slice_sizes(config, spec.module)
        for name, module in peft_model.named_modules():
            if not (isinstance(module, LoraLayer) and name.rsplit(".", 1)[-1] == spec.module):
                continue
            for adapter in module.lora_B:
                weight = module.lora_B[adapter].weight
                if sum(sizes.values()) != weight.shape[0]:
                    raise UserError(
                        f"peft_config.target_modules: {spec.module} of {name} has {weight.shape[0]} outputs, but "
                        f"the config's slices {sizes} add up to {sum(sizes.values())}; use the whole module"
                    )
                mask = block_mask(sizes, spec.chosen, r, weight)
                with torch.no_grad():
                    weight.mul_(mask)
                weight.register_hook(lambda grad, mask=mask: grad * mask)
                module.philora_slice_mask = mask
                # counted from the shapes, so a model on the meta device (philora check) gets the same number
                module.philora_held = weight.numel() - r * sum(sizes[name] for name in spec.chosen)
                held += module.philora_held
    return held


def block_mask(sizes: dict[str, int], chosen: list[str], r: int, like: torch.Tensor) -> torch.Tensor:
    """1 where slice j's rows meet its r columns of B, 0 elsewhere."""
    mask = torch.zeros_like(like)
    starts, at = {}, 0
    for name, size in sizes.items():
        starts[name] = at
        at += size
    for j, name in enumerate(chosen):
        mask[starts[name] : starts[name] + sizes[name], j * r : (j + 1) * r] = 1
    return mask
