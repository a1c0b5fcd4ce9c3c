"""Which modules get LoRA, checked against the model, and the peft model built from a `peft_config`.

PEFT adapts every module whose name ends with a target name and says nothing about target names that match
nothing. On Phi-3 that is a trap: the CookBook's `q_proj, k_proj, v_proj, gate_proj, up_proj` do not exist
(Phi-3 fuses them into `qkv_proj` and `gate_up_proj`), so PEFT would quietly adapt only `o_proj`/`down_proj`
or fail late. philora resolves targets itself and refuses names that match no module.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from philora import progress
from philora.config import PeftSection
from philora.errors import UserError
from philora.lora import slices
from philora.model.layout import FUSED_HOME

# Unfused names other tools use, and the Phi-3 module that holds them.


def _is_linear(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    # bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear; GPT-2 style Conv1D does not.
    return type(module).__name__ == "Conv1D"


def linear_names(model: torch.nn.Module) -> dict[str, int]:
    """Short names of the linear layers that can carry LoRA (the LM head excluded), with their counts."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    counts: Counter[str] = Counter()
    for name, module in model.named_modules():
        if _is_linear(module) and module is not head:
            counts[name.rsplit(".", 1)[-1]] += 1
    return dict(counts)


# Presets by name, for Phi-3's fused layout and for the unfused (Llama-style) one.
PRESETS = {
    "attention": (["qkv_proj", "o_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp": (["gate_up_proj", "down_proj"], ["gate_proj", "up_proj", "down_proj"]),
    "qv": (["qkv_proj:q,v"], ["q_proj", "v_proj"]),
}
INIT_FROM_WEIGHTS = ("pissa", "olora")  # initialisations that rewrite the base weights


def resolve_targets(model: torch.nn.Module, target_modules: str | list[str]) -> list[str]:
    """Presets become explicit lists; every name (and `module:slices` entry) is checked against the model."""
    available = linear_names(model)
    if target_modules == "all-linear":
        return sorted(available)
    if isinstance(target_modules, str):
        if target_modules not in PRESETS:
            raise UserError(
                f"peft_config.target_modules: {target_modules!r} is not a preset; use all-linear, "
                f"{', '.join(PRESETS)}, or a list of module names"
            )
        fused, unfused = PRESETS[target_modules]
        if "qkv_proj" in available:
            return list(fused)
        if all(name in available for name in unfused):
            return list(unfused)
        raise UserError(
            f"peft_config.target_modules: the preset {target_modules!r} knows Phi-3 and Llama-style module names; "
            f"list this model's own instead (its linear layers are {', '.join(sorted(available))})"
        )
    names = [name for name, _ in model.named_modules()]
    # peft's rule: a target matches a module whose full name equals it or ends with "." + target.
    modules = [t.partition(":")[0] for t in target_modules]
    for target in target_modules:
        slices.parse(target)  # a malformed slice spec is reported before anything else
    missing = [t for t in modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        hint = ""
        if any(m in FUSED_HOME for m in missing) and "qkv_proj" in available:
            homes = sorted({FUSED_HOME[m] for m in missing if m in FUSED_HOME})
            hint = f" (this model fuses them: use {', '.join(homes)}, or slices like qkv_proj:q,v)"
        raise UserError(
            f"peft_config.target_modules: {', '.join(missing)} match no module of {type(model).__name__}{hint}; "
            f"its linear layers are {', '.join(sorted(available))}"
        )
    return list(target_modules)


def apply_lora(model: Any, pc: PeftSection, quantized: bool = False, say: bool = True) -> Any:
    """Wrap `model` in a peft LoRA model per `pc`, print what was adapted (when `say`), and return it."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, pc.target_modules)
    specs = [spec for t in targets if (spec := slices.parse(t)) is not None]
    check_variants(pc, specs, quantized)
    ranks, alphas = slices.patterns(specs, pc.r, pc.lora_alpha, pc.use_rslora)
    lora_config = LoraConfig(
        task_type=pc.task_type,
        r=pc.r,
        lora_alpha=pc.lora_alpha,
        lora_dropout=pc.lora_dropout,
        bias=pc.bias,
        target_modules=[t.partition(":")[0] for t in targets],
        modules_to_save=pc.modules_to_save,
        use_rslora=pc.use_rslora,
        use_dora=pc.use_dora,
        init_lora_weights=pc.init_lora_weights,
        layers_to_transform=pc.layers_to_transform,
        rank_pattern=ranks,
        alpha_pattern=alphas,
    )
    peft_model = get_peft_model(model, lora_config)
    slices.restrict(peft_model, specs, pc.r)
    if say:
        progress.say(describe_adapters(peft_model).removeprefix("philora: "))
    return peft_model


def check_variants(pc: PeftSection, specs: list[slices.SliceSpec], quantized: bool) -> None:
    init = str(pc.init_lora_weights)
    from_weights = init.startswith(INIT_FROM_WEIGHTS)
    problems = []
    if specs and pc.use_dora:
        problems.append(
            "peft_config.use_dora: DoRA rescales every output row of a module, so slices left out would change too; "
            "use whole modules with DoRA"
        )
    if specs and (from_weights or init == "False"):
        problems.append(
            f"peft_config.init_lora_weights: {pc.init_lora_weights!r} starts B away from zero, which slices need; "
            "use true or gaussian with module:slices targets"
        )
    if from_weights and quantized:
        problems.append(
            f"peft_config.init_lora_weights: {init} initialises from the full-precision weights; train it on a base "
            "without model.quantization"
        )
    if problems:
        raise UserError(*problems)


def trainable_parameters(peft_model: Any) -> tuple[int, int]:
    """(trainable, total) as peft counts them, less the B entries that slices hold at zero."""
    trainable, total = peft_model.get_nb_trainable_parameters()  # counts 4-bit packed weights correctly
    held = sum(getattr(m, "philora_held", 0) for m in peft_model.modules())
    return trainable - held, total


def describe_adapters(peft_model: Any) -> str:
    """'LoRA on 120 modules (qkv_proj x30, ...): 4,884,480 trainable of 139,399,104 parameters (3.50%)'."""
    from peft.tuners.lora import LoraLayer

    adapted = Counter(n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer))
    trainable, total = trainable_parameters(peft_model)
    modules = ", ".join(f"{name} x{count}" for name, count in sorted(adapted.items()))
    return (
        f"philora: LoRA on {sum(adapted.values())} modules ({modules}): "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )
