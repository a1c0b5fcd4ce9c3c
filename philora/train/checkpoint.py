"""Checkpoints: everything needed to continue a run exactly, written atomically.

`checkpoints/step-N/` holds the adapter (PEFT format), optimizer and scheduler state, and `state.json` with the
step, the data position, the config and every RNG state. It is written under a temporary name and renamed when
complete, so a crash mid-write never leaves a checkpoint that looks whole; old ones are pruned only afterwards.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from philora.errors import UserError
from philora.rundir import RunDir

PREFIX = "step-"
# Keys that may differ between the run that wrote a checkpoint and the one resuming it.
RESUMABLE_CHANGES = {
    "training_config.output_dir",
    "training_config.logging_steps",
    "training_config.save_steps",
    "training_config.save_total_limit",
    "training_config.log_level",
    "training_config.run_name",
    "training_config.overwrite_output_dir",
    "training_config.logging_first_step",
}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = RunDir(output_dir).checkpoints
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def save(output_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], keep: int | None,
         weights: dict[str, torch.Tensor] | None = None) -> Path:  # fmt: skip
    """Write checkpoint `step-N` atomically; `weights` is the gathered state dict of a sharded (FSDP/DeepSpeed)
    model, None to read the model directly."""
    root = RunDir(output_dir).checkpoints
    final = root / f"{PREFIX}{state['step']}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "adapter", state_dict=weights)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
        tmp / "trainer.pt",
    )
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep is not None:
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def load(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNGs from `path`; return its state.json."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter" / "adapter_model.safetensors"))
    saved = torch.load(path / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"])
    return json.loads((path / "state.json").read_text())


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'section.key: saved -> current' for each setting that changed in a way resuming cannot honour."""
    out = []
    for section, values in current.items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key)
            if old != value and f"{section}.{key}" not in RESUMABLE_CHANGES:
                out.append(f"{section}.{key}: {old!r} in the checkpoint, {value!r} now")
    return out


def find_resume_point(output_dir: Path, resume: str | bool) -> Path:
    """The checkpoint `--resume` names, or the newest one in the output dir."""
    if isinstance(resume, str):
        path = Path(resume)
        if (path / "state.json").is_file():
            return path
        found = checkpoints(path)
        if not found:
            raise UserError(f"--resume {resume}: no checkpoint there (expected a checkpoints/{PREFIX}N dir)")
        return found[-1]
    found = checkpoints(output_dir)
    if not found:
        raise UserError(f"--resume: {output_dir} has no checkpoints to resume from; train without --resume")
    return found[-1]
