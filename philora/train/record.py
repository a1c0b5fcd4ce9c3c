"""run.json: what ran (config as resolved, library versions, data hash, seed), how long, and what came out."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from philora import hardware
from philora.config import Config
from philora.data import PreparedData
from philora.data import report as data_report
from philora.lora.targets import trainable_parameters
from philora.rundir import RunDir
from philora.train.state import Progress
from philora.versions import library_versions


def write_run_record(
    out: Path,
    config: Config,
    prepared: PreparedData,
    model: Any,
    progress: Progress,
    records: list[dict[str, Any]],
    evaluation: dict[str, Any] | None,
    wall_seconds: float,
    processes: int = 1,
    mixed_precision: str = "no",
    selection: dict[str, Any] | None = None,
) -> None:
    trainable, total = trainable_parameters(model)
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    record = {
        "config": config.to_dict(),
        "versions": library_versions(),
        "command": sys.argv,
        "seed": config.training_config.seed,
        "data": data_report.as_record(prepared, config.data),
        "device": str(hardware.device()),
        "processes": processes,
        # the arithmetic the run used, resolved: eval, chat, serve and merge load the weights in this dtype
        "model_dtype": hardware.dtype_name(next(model.parameters()).dtype),
        "mixed_precision": mixed_precision,
        "torch_threads": torch.get_num_threads(),
        "peak_memory_mb": peak_memory_mb(),
        "parameters": {"trainable": trainable, "total": total},
        "steps": progress.step,
        "tokens": progress.tokens,
        "trained_tokens": progress.trained_tokens,
        "train_seconds": round(progress.train_seconds, 2),
        "tokens_per_s": round(progress.tokens / max(progress.train_seconds, 1e-9), 1),
        "wall_seconds": round(wall_seconds, 2),
        "final_loss": losses[-1] if losses else None,
        "final_eval_loss": evals[-1] if evals else None,
        # the evaluations during training: the best, the one adapter/ holds, early stopping (train/selection.py)
        "selection": selection,
        # eval.json without the answers and what run.json records already: prompts, metrics, eval losses
        "generation_eval": {k: v for k, v in evaluation.items() if k not in ("samples", "settings", "versions")}
        if evaluation
        else None,
    }
    RunDir(out).record.write_text(json.dumps(record, indent=2) + "\n")


def peak_memory_mb() -> float:
    """This process's peak memory so far: the GPU's allocated peak on CUDA, else the peak resident set size."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(hardware.resident_bytes("VmHWM") / 2**20, 1)
