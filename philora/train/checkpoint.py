"""Checkpoints: everything needed to continue a run exactly, in tensors and plain data only, written so that a kill
or a full disk at any moment leaves either a whole checkpoint or one that is not counted.

`checkpoints/step-N/` holds the adapter (PEFT format: safetensors), `trainer.json` + `trainer.safetensors` (the
optimizer, scheduler and RNG states as plain data and tensors, train/plain.py: nothing is unpickled, so a crafted
checkpoint cannot run code on `--resume`), `state.json` (the step, the data position, the config) and, written
last, `complete.json`, the marker that makes it a checkpoint: the size of every other file. A checkpoint is written
under `.tmp-step-N`, each file and the dir fsynced, the marker added, then renamed into place; old ones are pruned
only afterwards, marker first, so a kill mid-prune leaves a dir that is not counted.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from philora.errors import UserError
from philora.paths import umask_modes
from philora.preflight.report import size
from philora.rundir import RunDir
from philora.train import plain
from philora.train.durable import TEMPORARY, flush_tree, fsync, put_in_place

PREFIX = "step-"
MARKER = "complete.json"
STATE = "state.json"
TRAINER = "trainer.json"  # the optimizer, scheduler and RNG states; their tensors in TRAINER_TENSORS
TRAINER_TENSORS = "trainer.safetensors"
PICKLED = "trainer.pt"  # where earlier philora versions kept them, pickled: never read
ADAPTER = "adapter/adapter_model.safetensors"
BEST = "best_adapter.safetensors"  # load_best_model_at_end: the best evaluation's weights, when not this step's
RESTORED = ("optimizer", "scheduler", "rng")  # what trainer.json holds
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
    # what is evaluated, not what trains: a run of an earlier philora (whose defaults had no evaluation) resumes
    # under today's auto values, and its answers before training are taken then (train/run.py finish)
    "training_config.predict_with_generate",
    "training_config.generation_max_length",
    "training_config.per_device_eval_batch_size",
    "training_config.do_eval",
    "training_config.fail_on_regression",  # a verdict on the finished run, not a setting of the training
}


@dataclass
class RngState:
    """Every random generator a step may draw from, as tensors and plain numbers (nothing that needs unpickling)."""

    python: tuple[Any, ...]  # random.getstate(): (version, 625 ints, gauss_next)
    numpy_key: torch.Tensor  # numpy's MT19937 key, 624 uint32 held as int64
    numpy_pos: int
    numpy_has_gauss: int
    numpy_cached_gaussian: float
    torch: torch.Tensor
    cuda: list[torch.Tensor] = field(default_factory=list)  # one per GPU

    @classmethod
    def capture(cls) -> RngState:
        _, key, pos, has_gauss, cached = np.random.get_state()
        return cls(random.getstate(), torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss),
                   float(cached), torch.get_rng_state(),
                   torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])  # fmt: skip

    def restore(self) -> None:
        version, internal, gauss = self.python
        random.setstate((version, tuple(internal), gauss))
        key = self.numpy_key.numpy().astype(np.uint32)
        np.random.set_state(("MT19937", key, self.numpy_pos, self.numpy_has_gauss, self.numpy_cached_gaussian))
        torch.set_rng_state(self.torch)
        if self.cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.cuda)


@dataclass
class Checkpoint:
    """A checkpoint read back and checked (every file opened) when `--resume` chooses it; `restore` applies it once
    the model, optimizer and scheduler exist."""

    path: Path
    state: dict[str, Any]  # state.json: step, progress, config, torch_threads
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: RngState
    best: dict[str, torch.Tensor] | None = None  # BEST's weights, when written

    @property
    def step(self) -> int:
        return int(self.state["step"])


class Damaged(Exception):
    """A checkpoint that cannot be resumed; the message says why."""


def step_of(path: Path) -> int | None:
    """N for a `step-N` dir, else None."""
    number = path.name.removeprefix(PREFIX)
    return int(number) if path.name.startswith(PREFIX) and number.isdigit() else None


def step_dirs(root: Path) -> list[Path]:
    """Every `step-N` dir under `root`, complete or not, oldest first."""
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0)


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (their marker written), oldest first."""
    return [p for p in step_dirs(RunDir(output_dir).checkpoints) if (p / MARKER).is_file()]


# Writing.


def save(output_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], keep: int | None,
         weights: dict[str, torch.Tensor] | None = None, best: dict[str, torch.Tensor] | None = None,
         best_step: int | None = None) -> Path:  # fmt: skip
    """Write checkpoint `step-N`, then prune to the newest `keep` and the one of `best_step`, if any; `weights` is
    the gathered state dict of a sharded (FSDP/DeepSpeed) model, None to read the model directly; `best` the best
    evaluation's adapter weights, kept for load_best_model_at_end. A full disk is a UserError, the partial files
    gone."""
    root = RunDir(output_dir).checkpoints
    final = root / f"{PREFIX}{state['step']}"
    tmp = root / f"{TEMPORARY}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    cause, need = None, 0
    try:
        write(tmp, model, optimizer, scheduler, state, weights, best)
    except Exception as e:
        # torch's writer reports a full disk as a RuntimeError ("basic_ios::clear", "unexpected pos") without the
        # errno, so a failed write with less room left than the checkpoint needs counts as a full disk too.
        need = checkpoint_bytes(model, optimizer, weights)
        if disk_full(e) or shutil.disk_usage(output_dir).free < need:
            cause = first_line(e)
        shutil.rmtree(tmp, ignore_errors=True)
        if cause is None:
            raise
    if cause is not None:  # raised out here, not chained: the error's frames hold torch's writer and its open file
        last = checkpoints(output_dir)
        raise UserError(
            f"checkpoint {final}: the disk is full ({cause}); a checkpoint needs about {amount(need)} and "
            f"{amount(shutil.disk_usage(output_dir).free)} is free in {root}; free space there (or lower "
            "training_config.save_total_limit)" + (f" and continue from {last[-1]} with --resume" if last else "")
        )
    put_in_place(tmp, final)
    prune(root, keep, best_step)
    return final


def write(tmp: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
          weights: dict[str, torch.Tensor] | None, best: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """The checkpoint's files into `tmp`, flushed, the marker last."""
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "adapter", state_dict=weights)
    if best is not None:
        save_file({k: v.contiguous() for k, v in best.items()}, tmp / BEST)
    trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "rng": vars(RngState.capture())}  # fmt: skip
    plain.save(trainer, tmp / TRAINER, tmp / TRAINER_TENSORS)
    (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
    umask_modes(tmp)
    seal(tmp)


def seal(tmp: Path) -> None:
    """Flush every file of `tmp` to the disk, then write the marker listing their sizes, flushed too: a power cut
    after the rename must not find a marker over files still in the page cache."""
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    flush_tree(tmp)
    with (tmp / MARKER).open("w") as f:
        json.dump({"files": files}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    fsync(tmp)


def prune(root: Path, keep: int | None, best_step: int | None = None) -> None:
    """Keep the newest `keep` complete checkpoints, and the best evaluation's (`best_step`) besides; remove stale
    temporary dirs and incomplete checkpoints older than the newest complete one (what kills left). The marker
    goes first, so a kill mid-removal leaves a dir that is not counted."""
    for stale in root.glob(f"{TEMPORARY}*"):
        shutil.rmtree(stale, ignore_errors=True)
    complete = [p for p in step_dirs(root) if (p / MARKER).is_file()]
    if not complete:
        return
    newest = step_of(complete[-1]) or 0
    doomed = [p for p in step_dirs(root) if not (p / MARKER).is_file() and (step_of(p) or 0) < newest]
    doomed += [p for p in complete[:-keep] if step_of(p) != best_step] if keep else []
    for old in doomed:
        (old / MARKER).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)


def disk_full(error: BaseException) -> bool:
    return (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        text in str(error) for text in ("No space left", "Disk quota exceeded")
    )


def checkpoint_bytes(model: Any, optimizer: Any, weights: dict[str, torch.Tensor] | None) -> int:
    """About what a checkpoint takes on disk: the adapter's tensors and the optimizer's, plus the small files."""
    tensors = list(weights.values()) if weights is not None else [p for p in model.parameters() if p.requires_grad]
    tensors += [v for s in optimizer.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors) + 64 * 1024  # RNG states, JSON, safetensors header


def amount(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1024**2 else size(n)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# Reading.


def read(path: Path) -> Checkpoint:
    """Checkpoint `path` read and checked; Damaged says why it cannot be resumed. Nothing is unpickled:
    tensors and plain data."""
    from safetensors.torch import load_file

    marker = path / MARKER
    if not marker.is_file():
        raise Damaged(
            f"{MARKER} is missing (cut off while being written or pruned, or written by an older philora, whose "
            "checkpoints cannot be read without unpickling)"
        )
    try:
        recorded = dict(json.loads(marker.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Damaged(f"{MARKER} does not parse ({first_line(e)})") from None
    if (path / PICKLED).exists() and not (path / TRAINER).exists():
        raise Damaged(
            f"{PICKLED} is pickled state (an older philora's checkpoint, or a crafted file), which philora does not "
            "unpickle: unpickling can run code"
        )
    for name in (STATE, TRAINER, TRAINER_TENSORS, ADAPTER, *recorded):
        file = path / name
        if not file.is_file():
            raise Damaged(f"{name} is missing")
        if (actual := file.stat().st_size) != (expected := recorded.get(name, actual)):
            what = "is truncated" if actual < expected else "has grown"
            raise Damaged(f"{name} {what} ({actual:,} bytes where {expected:,} were written)")
    try:
        state = json.loads((path / STATE).read_text())
        if not {"step", "progress", "config"} <= state.keys():
            raise ValueError("step, progress or config is missing")
    except (OSError, ValueError, AttributeError) as e:
        raise Damaged(f"{STATE} does not parse ({first_line(e)})") from None
    try:
        trainer = plain.load(path / TRAINER, path / TRAINER_TENSORS)
    except Exception as e:  # bad JSON, a damaged safetensors file, the two not matching: whatever the reader says
        raise Damaged(f"{TRAINER} or {TRAINER_TENSORS} does not load ({first_line(e)})") from None
    if not isinstance(trainer, dict) or not all(isinstance(trainer.get(k), dict) for k in RESTORED):
        raise Damaged(f"{TRAINER} lacks the {', '.join(RESTORED)} state")
    try:
        adapter = load_file(path / ADAPTER, device="cpu")
        best = load_file(path / BEST, device="cpu") if (path / BEST).is_file() else None
        return Checkpoint(path, state, adapter, trainer["optimizer"], trainer["scheduler"], RngState(**trainer["rng"]),
                          best)  # fmt: skip
    except Exception as e:
        raise Damaged(f"{ADAPTER} or {TRAINER} does not load ({first_line(e)})") from None


def restore(found: Checkpoint, model: Any, optimizer: Any, scheduler: Any) -> None:
    """Put a checkpoint's adapter weights, optimizer, scheduler and RNG states in place."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, found.adapter)
    optimizer.load_state_dict(found.optimizer)
    scheduler.load_state_dict(found.scheduler)
    found.rng.restore()


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'section.key: saved -> current' for each setting that changed in a way resuming cannot honour."""
    out = []
    for section, values in current.items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key)
            if old != value and f"{section}.{key}" not in RESUMABLE_CHANGES:
                out.append(f"{section}.{key}: {old!r} in the checkpoint, {value!r} now")
    return out


def choose(output_dir: Path, resume: str | bool) -> tuple[Checkpoint, list[str]]:
    """The checkpoint `--resume` names, or the newest one in its run dir that loads, read; with a line for each
    newer one skipped and why."""
    if isinstance(resume, str) and is_checkpoint_dir(path := Path(resume)):
        try:
            return read(path), []
        except Damaged as e:
            raise UserError(f"--resume {path}: {e}; name another checkpoint, or the run dir to take the newest "
                            "that loads") from None  # fmt: skip
    run_dir = Path(resume) if isinstance(resume, str) else output_dir
    skipped = []
    for path in reversed(step_dirs(RunDir(run_dir).checkpoints)):
        try:
            return read(path), skipped
        except Damaged as e:
            skipped.append(f"skipping {path}: {e}")
    again = "start it again without --resume (with training_config.overwrite_output_dir: true)"
    if skipped:
        raise UserError(*skipped, f"--resume: no checkpoint of the run in {run_dir} can be resumed; {again}")
    if not RunDir(run_dir).written():
        raise UserError(f"--resume: {run_dir} holds no run to resume; train without --resume")
    raise UserError(
        f"--resume: the run in {run_dir} stopped before its first checkpoint, so nothing there can be resumed; "
        f"{again}, and nothing will be lost"
    )


def is_checkpoint_dir(path: Path) -> bool:
    return step_of(path) is not None or any((path / name).exists() for name in (MARKER, STATE, TRAINER))


def set_aside_newer(output_dir: Path, found: Checkpoint) -> list[Path]:
    """Unmark this run's checkpoints newer than the one resumed (damaged ones skipped, or the continuation an
    explicit older `--resume` replaces): they are no longer counted, and pruning removes them once the run
    passes them. Counted, a damaged one would be kept by save_total_limit in place of a good one."""
    root = RunDir(output_dir).checkpoints
    if not root.is_dir() or found.path.parent.resolve() != root.resolve():
        return []
    newer = [p for p in step_dirs(root) if (step_of(p) or 0) > found.step and (p / MARKER).is_file()]
    for path in newer:
        (path / MARKER).unlink()
    return newer
