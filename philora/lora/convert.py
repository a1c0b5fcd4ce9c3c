"""Adapter conversions: unfused names (q_proj/k_proj/v_proj, gate_proj/up_proj) <-> Phi-3's fused ones, and
loralib-style state dicts -> PEFT adapters.

A LoRA on several slices of a fused module is one LoRA whose A stacks the slices' A and whose B places each
slice's B in that slice's rows and its own columns (see slices.py). Going to fused names builds exactly that;
going back takes, for each slice, the columns its rows of B use, so a fused adapter made from unfused ones comes
back tensor for tensor, and any fused adapter splits into unfused ones with the same update.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from philora.errors import UserError
from philora.model.layout import FUSED, FUSED_HOME, part_rows
from philora.paths import umask_modes

PREFIX = "base_model.model."


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / (r**0.5 if rslora else r)


def _alpha_for(scaling: float, r: int, rslora: bool) -> float:
    return scaling * (r**0.5 if rslora else r)


def _module_settings(config: dict[str, Any], module: str) -> tuple[int, float]:
    """(rank, alpha) of a module under peft's rank_pattern / alpha_pattern (matched by the last name part)."""
    short = module.rsplit(".", 1)[-1]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = next((v for k, v in ranks.items() if module.endswith(k) or short == k), config["r"])
    alpha = next((v for k, v in alphas.items() if module.endswith(k) or short == k), config["lora_alpha"])
    return r, alpha


def _others(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors that are not LoRA A/B (modules_to_save, trainable tokens): carried over unchanged."""
    return {k: v for k, v in state.items() if not k.endswith((".lora_A.weight", ".lora_B.weight"))}


def _refuse_dora(config: dict[str, Any]) -> None:
    if config.get("use_dora"):
        raise UserError("a DoRA adapter's magnitudes belong to whole modules; it cannot be split or fused")


def _layers(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"A": ..., "B": ...}} from PEFT keys (`...<module>.lora_A.weight`)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for part in ("A", "B"):
            marker = f".lora_{part}.weight"
            if key.endswith(marker):
                found.setdefault(key[: -len(marker)], {})[part] = value
    return found


def split_to_fused(
    state: dict[str, torch.Tensor], config: dict[str, Any], sizes: dict[str, dict[str, int]]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A PEFT adapter on q/k/v/gate/up_proj as one on qkv_proj/gate_up_proj: (state dict, adapter config)."""
    _refuse_dora(config)
    rslora = bool(config.get("use_rslora"))
    layers, out = _layers(state), _others(state)
    groups: dict[str, dict[str, str]] = {}  # fused module path -> {unfused name: its module path}
    for path in layers:
        parent, _, name = path.rpartition(".")
        if name in FUSED_HOME:
            groups.setdefault(f"{parent}.{FUSED_HOME[name]}", {})[name] = path
        else:
            out.update({f"{path}.lora_{p}.weight": t for p, t in layers[path].items()})
    ranks, alphas = dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {})
    for fused_path, members in groups.items():
        fused = fused_path.rsplit(".", 1)[-1]
        order = [n for n in FUSED[fused] if n in members]
        settings = {n: _module_settings(config, members[n]) for n in order}
        scales = {n: _scaling(alpha, r, rslora) for n, (r, alpha) in settings.items()}
        total_rank = sum(r for r, _ in settings.values())
        scale = scales[order[0]]
        a_parts, b = [], None
        column = 0
        row_of = {}
        at = 0
        for name, rows in sizes[fused].items():
            row_of[name] = at
            at += rows
        for name in order:
            a, b_part = layers[members[name]]["A"], layers[members[name]]["B"]
            if b is None:
                b = b_part.new_zeros((at, total_rank))
            if scales[name] != scale:  # fold a different per-slice scale into B
                b_part = b_part * (scales[name] / scale)
            a_parts.append(a)
            b[row_of[name] : row_of[name] + b_part.shape[0], column : column + a.shape[0]] = b_part
            column += a.shape[0]
        out[f"{fused_path}.lora_A.weight"] = torch.cat(a_parts)
        out[f"{fused_path}.lora_B.weight"] = b
        key = fused_path.removeprefix(PREFIX)
        ranks[key] = total_rank
        alphas[key] = _alpha_for(scale, total_rank, rslora)
    for member_paths in groups.values():
        for path in member_paths.values():
            ranks.pop(path.removeprefix(PREFIX), None)
            alphas.pop(path.removeprefix(PREFIX), None)
    targets = {FUSED_HOME.get(t, t) for t in _names(config["target_modules"])}
    return out, {**config, "target_modules": sorted(targets), "rank_pattern": ranks, "alpha_pattern": alphas}


def fused_to_split(
    state: dict[str, torch.Tensor], config: dict[str, Any], sizes: dict[str, dict[str, int]]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A PEFT adapter on qkv_proj/gate_up_proj as one on the unfused projections: (state dict, adapter config).

    Each projection keeps the columns of B its rows use (all of them for an ordinary fused LoRA), so the update
    of every projection is unchanged; a projection whose rows of B are all zero gets no LoRA.
    """
    _refuse_dora(config)
    rslora = bool(config.get("use_rslora"))
    layers, out = _layers(state), _others(state)
    ranks, alphas = dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {})
    targets: set[str] = set()
    for path, tensors in layers.items():
        parent, _, name = path.rpartition(".")
        if name not in FUSED:
            out.update({f"{path}.lora_{p}.weight": t for p, t in tensors.items()})
            targets.add(name)
            continue
        r, alpha = _module_settings(config, path)
        scale = _scaling(alpha, r, rslora)
        a, b, at = tensors["A"], tensors["B"], 0
        ranks.pop(path.removeprefix(PREFIX), None)
        alphas.pop(path.removeprefix(PREFIX), None)
        for part, rows in sizes[name].items():
            block = b[at : at + rows]
            at += rows
            used = block.abs().sum(dim=0).nonzero().flatten()
            if len(used) == 0:
                continue
            part_path = f"{parent}.{part}"
            out[f"{part_path}.lora_A.weight"] = a[used].clone()
            out[f"{part_path}.lora_B.weight"] = block[:, used].clone()
            ranks[part_path.removeprefix(PREFIX)] = len(used)
            alphas[part_path.removeprefix(PREFIX)] = _alpha_for(scale, len(used), rslora)
            targets.add(part)
    return out, {**config, "target_modules": sorted(targets), "rank_pattern": ranks, "alpha_pattern": alphas}


def _names(targets: Any) -> list[str]:
    return [targets] if isinstance(targets, str) else list(targets)


def convert_adapter(src: Path, dst: Path, to: str, model_config: Any) -> None:
    """Rewrite the PEFT adapter in `src` with fused (`to="fused"`) or unfused (`to="split"`) names into `dst`."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "adapter_config.json").read_text())
    state = load_file(src / "adapter_model.safetensors")
    convert = split_to_fused if to == "fused" else fused_to_split
    new_state, new_config = convert(state, config, part_rows(model_config))
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in new_state.items()}, dst / "adapter_model.safetensors")
    umask_modes(dst)
    (dst / "adapter_config.json").write_text(json.dumps(new_config, indent=2) + "\n")


def loralib_to_peft(
    state: dict[str, torch.Tensor],
    r: int,
    lora_alpha: float,
    merged: dict[str, tuple[list[int], list[bool]]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A loralib-style state dict (`<module>.lora_A`, `<module>.lora_B`) as PEFT adapter tensors and config fields.

    `merged` names the MergedLinear modules: path -> (slice sizes, enable_lora). Their per-slice B is placed
    block-wise as a rank r*k LoRA with alpha*k, which is the same update.
    """
    merged = merged or {}
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    targets: set[str] = set()
    for key, value in state.items():
        if not key.endswith(".lora_A"):
            continue
        path = key.removesuffix(".lora_A")
        a, b = value, state[f"{path}.lora_B"]
        if path in merged:
            slice_sizes, enabled = merged[path]
            full = b.new_zeros((sum(slice_sizes), a.shape[0]))
            row = b_row = column = 0
            for size, on in zip(slice_sizes, enabled, strict=True):
                if on:
                    full[row : row + size, column : column + r] = b[b_row : b_row + size]
                    b_row += size
                    column += r
                row += size
            b = full
            ranks[path] = a.shape[0]
            alphas[path] = lora_alpha * a.shape[0] / r
        out[f"{PREFIX}{path}.lora_A.weight"] = a
        out[f"{PREFIX}{path}.lora_B.weight"] = b
        targets.add(path.rsplit(".", 1)[-1])
    fields = {"r": r, "lora_alpha": lora_alpha, "target_modules": sorted(targets)}
    return out, {**fields, "rank_pattern": ranks, "alpha_pattern": alphas}


def peft_to_loralib(
    state: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """PEFT adapter tensors as a loralib-style state dict, and each module's (r, lora_alpha) to build its
    `lora.Linear` with. A LoRA on a fused module comes back as one Linear LoRA with the same update."""
    out, settings = {}, {}
    for path, tensors in _layers(state).items():
        name = path.removeprefix(PREFIX)
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = tensors["A"], tensors["B"]
        settings[name] = _module_settings(config, path)
    return out, settings
