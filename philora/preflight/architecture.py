"""The model without its weights: built from its config on the meta device, LoRA applied as training applies it.

Nothing is allocated and no weight file is read, so a 14B model is inspected in seconds on a laptop; parameter
counts and the adapter's trainable parameters come out exactly as a real run makes them, because the same code
(`apply_lora`) builds the adapter.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from philora import hardware
from philora.config import Config
from philora.lora import slices
from philora.lora.targets import (
    INIT_FROM_WEIGHTS,
    apply_lora,
    check_variants,
    linear_names,
    resolve_targets,
    trainable_parameters,
)
from philora.model import fast_path
from philora.model.layout import FUSED, SLICES
from philora.model.load import check_attention, from_pretrained, longrope_boundary, model_source


@dataclass
class Architecture:
    """What `philora check` reports of the model, and what the memory estimate needs."""

    name: str  # the config's architecture, e.g. Phi3ForCausalLM
    model: Any  # the peft model on the meta device
    dtype: torch.dtype  # the weights' dtype a run would load
    parameters: int  # of the base model, tied weights once
    linear_parameters: int  # in the linear layers that 4-bit/8-bit quantization would pack (the head excluded)
    trainable: int  # as training counts them (slices' held entries excluded)
    total: int  # parameters with the adapter's, as training reports them
    adapted: dict[str, int]  # adapted module name -> how many
    attention: str  # the attention implementation, checked to run here
    fused: dict[str, str]  # fused module -> "q,k,v adapted" or "not adapted"
    tied_embeddings: bool
    rope: str  # rope type, e.g. default, longrope
    context: int | None  # max_position_embeddings
    original_context: int | None  # longrope: where the long factors begin
    hidden_size: int
    vocab_size: int
    layers: int


def model_config(config: Config) -> Any:
    """The model's transformers config: config.json alone, no weights."""
    from transformers import AutoConfig

    return from_pretrained(AutoConfig, model_source(config.model), config.model, "config")


def build(config: Config) -> Architecture:
    """The config's model and LoRA on the meta device; UserError for targets or settings that cannot work."""
    from transformers import AutoModelForCausalLM

    mc = config.model
    model_cfg = model_config(config)
    dtype = hardware.resolve_dtype(mc.dtype, hardware.device())
    check_attention(mc, hardware.device())
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(
            model_cfg, dtype=dtype, attn_implementation=mc.attn_implementation, trust_remote_code=mc.trust_remote_code
        )
    parameters = sum(p.numel() for p in base.parameters())
    head = base.get_output_embeddings()
    linear = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    present = linear_names(base)
    targets = resolve_targets(base, config.peft_config.target_modules)
    pc = config.peft_config
    check_variants(pc, [s for t in targets if (s := slices.parse(t)) is not None], mc.quantization is not None)
    # initialisations computed from the weights (PiSSA, OLoRA) need values; the shapes are those of the plain one
    if str(pc.init_lora_weights).startswith(INIT_FROM_WEIGHTS):
        pc = dataclasses.replace(pc, init_lora_weights=True)
    peft_model = apply_lora(base, pc, quantized=mc.quantization is not None, say=False)
    fast_path.install(peft_model)  # as a training step runs, so the memory estimate counts what it keeps
    from peft.tuners.lora import LoraLayer

    adapted = Counter(n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer))
    trainable, total = trainable_parameters(peft_model)
    rope = getattr(model_cfg, "rope_parameters", None) or getattr(model_cfg, "rope_scaling", None) or {}
    return Architecture(
        name=(getattr(model_cfg, "architectures", None) or [type(base).__name__])[0],
        model=peft_model,
        dtype=dtype,
        parameters=parameters,
        linear_parameters=linear,
        trainable=trainable,
        total=total,
        adapted=dict(sorted(adapted.items())),
        attention=mc.attn_implementation,
        fused=fused_coverage(present, targets, adapted),
        tied_embeddings=bool(getattr(model_cfg, "tie_word_embeddings", False)),
        rope=str(rope.get("rope_type", rope.get("type", "default"))),
        context=getattr(model_cfg, "max_position_embeddings", None),
        original_context=longrope_boundary(model_cfg),
        hidden_size=model_cfg.hidden_size,
        vocab_size=model_cfg.vocab_size,
        layers=model_cfg.num_hidden_layers,
    )


def fused_coverage(present: dict[str, int], targets: list[str], adapted: Counter[str]) -> dict[str, str]:
    """For each fused projection the model has (`present`: its linear layers): which of its slices LoRA adapts."""
    coverage = {}
    for fused in (f for f in FUSED if f in present):
        spec = next((s for t in targets if t.partition(":")[0] == fused and (s := slices.parse(t))), None)
        chosen = spec.chosen if spec else SLICES[fused]
        coverage[fused] = ",".join(chosen) + " adapted" if fused in adapted else "not adapted"
    return coverage
