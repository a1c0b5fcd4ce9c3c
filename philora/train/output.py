"""The run's output dir: made ready for a new run (prepare_output_dir: only what philora wrote there is ever
removed, and a folder that is not a philora run is refused) and the trained adapter written into it whole
(save_adapter), and for PiSSA/OLoRA the adapter as initialised (save_initial_adapter)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from philora.config import PeftSection
from philora.errors import UserError
from philora.lora.targets import INIT_FROM_WEIGHTS
from philora.paths import umask_modes
from philora.rundir import RunDir
from philora.train import checkpoint
from philora.train.durable import flush_tree, put_in_place


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """A new run's dir: a new or empty one, or a philora run's, whose files go when asked to overwrite it. Only what
    the run's manifest says philora wrote is removed; a dir that is not a philora run is never emptied. The manifest
    is written before anything else, so that whatever this run writes is known to be its own."""
    files = RunDir(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out}: is a file; choose another --output, a new or empty directory")
    if files.recorded() is None and out.is_dir() and (held := sorted(p.name for p in out.iterdir())):
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise UserError(
            f"--output {out}: is not empty ({shown}) and not a philora run, so philora will neither write into it "
            "nor remove anything there; choose another --output, a new or empty directory"
        )
    existing = files.written()
    if existing and not overwrite:
        held = ", ".join(dict.fromkeys(p.relative_to(out).parts[0] for p in existing))
        if checkpoint.checkpoints(out):
            raise UserError(
                f"--output {out}: already holds a run ({held}); continue it with --resume, choose another --output, "
                "or set training_config.overwrite_output_dir: true to replace it"
            )
        if any(p == files.adapter or files.adapter in p.parents for p in existing):
            raise UserError(
                f"--output {out}: already holds a finished run ({held}); choose another --output, or set "
                "training_config.overwrite_output_dir: true to replace it"
            )
        raise UserError(
            f"--output {out}: holds a run that stopped before its first checkpoint ({held}), so there is nothing to "
            "resume and nothing is lost by starting it again: set training_config.overwrite_output_dir: true, or "
            "choose another --output"
        )
    files.remove_written()
    files.write_manifest(files.run_names())


def save_adapter(files: RunDir, model: Any, tokenizer: Any, weights: dict[str, torch.Tensor] | None,
                 initial_adapter: str | None) -> None:  # fmt: skip
    """The adapter and its tokenizer written beside adapter/ under a temporary name, flushed to the disk, then
    renamed into place, so a kill or a power cut leaves the previous adapter/ (or none) or this one, whole, never a
    part. Its files are added to the manifest first; a person's files in the previous adapter/ are kept."""
    staged = files.staged_adapter
    shutil.rmtree(staged, ignore_errors=True)  # a killed finish's, philora's own
    # PiSSA/OLoRA adapters are saved converted to plain LoRA on the original base weights.
    model.save_pretrained(staged, state_dict=weights, path_initial_model_for_weight_conversion=initial_adapter)
    tokenizer.save_pretrained(staged)
    umask_modes(staged)
    names = [f"{files.adapter.name}/{p.name}" + ("/" if p.is_dir() else "") for p in staged.iterdir()]
    kept = files.unrecorded(files.adapter) if files.adapter.is_dir() else []
    for path in kept:  # copied, not moved: until the rename, the previous adapter/ stays whole
        if not (staged / path.name).exists():
            shutil.copytree(path, staged / path.name) if path.is_dir() else shutil.copy2(path, staged)
    flush_tree(staged)
    files.add_to_manifest(names)
    put_in_place(staged, files.adapter)


def save_initial_adapter(model: Any, out: Path, pc: PeftSection) -> str | None:
    """For initialisations that rewrite the base weights (PiSSA, OLoRA), the adapter as initialised, which peft
    needs to convert the trained one back onto the original base; None for the others."""
    if not str(pc.init_lora_weights).startswith(INIT_FROM_WEIGHTS):
        return None
    path = RunDir(out).lora_init
    lora_config = model.peft_config["default"]
    lora_config.init_lora_weights = True  # peft's convention for the saved starting point
    with warnings.catch_warnings():  # peft warns that PiSSA/OLoRA adapters need converting: this is for that
        warnings.filterwarnings("ignore", message=".*changes the base weights of the model.*")
        model.save_pretrained(path)
    umask_modes(path)
    lora_config.init_lora_weights = pc.init_lora_weights
    return str(path)
