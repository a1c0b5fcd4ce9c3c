"""A sweep's dir and its state on disk: sweep.json (the flags it runs with), the Optuna study in a journal file
(every trial's values, state and intermediate results, appended as they happen, so a kill -9 loses nothing
written), and a lock so that two sweeps never share a dir.

The study always maximises a score: the metric's value where greater is better, its negative where lower is. So the
direction can wait for the first trial's run.json to name the metric, when no --metric was given; what the
sweep shows is the metric's own value (report.py).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from philora.errors import UserError

STUDY = "philora-sweep"
JOURNAL = "optuna-journal.log"
SETTINGS = "sweep.json"
LOCK = "sweep.lock"
WRITER = "philora sweep"


@dataclass
class Settings:
    """sweep.json: what a sweep runs with. A rerun into the same dir continues the sweep only with the same base
    (config, --set), the same ranges and the same metric; --trials and --time-budget may change between runs."""

    config: str | None  # --config as given (None: the demo)
    overrides: list[str]  # --set, in order
    ranges: dict[str, str]  # key -> its range written one way (Range.canonical)
    metric: str | None  # --metric, or the one the first trial's run chose; None until then
    greater_is_better: bool | None  # with the metric
    trials: int = 8
    time_budget: str | None = None

    def conflicts(self, given: Settings, out: Path) -> list[str]:
        """One line per flag that differs from the sweep already in `out` (self), with the fix."""
        fix = f"use another --output for a new sweep, or the flags {out} was swept with to continue it"
        shown = {
            "--config": (self.config or "(the demo)", given.config or "(the demo)"),
            "--set": (" ".join(self.overrides) or "(none)", " ".join(given.overrides) or "(none)"),
            "--set-range": (_ranges(self.ranges), _ranges(given.ranges)),
        }
        if given.metric is not None and self.metric is not None:
            shown["--metric"] = (self.metric, given.metric)
        if given.greater_is_better is not None and self.greater_is_better is not None:
            shown["--greater-is-better"] = tuple(_direction(v) for v in (self.greater_is_better,
                                                                          given.greater_is_better))  # fmt: skip
        return [f"{flag} {new}: {out} holds a sweep with {flag} {old}; {fix}"
                for flag, (old, new) in shown.items() if old != new]  # fmt: skip


def _ranges(ranges: dict[str, str]) -> str:
    return " ".join(f"{key}={spec}" for key, spec in sorted(ranges.items()))


def _direction(greater: bool) -> str:
    return "(higher is better)" if greater else "(lower is better)"


def prepare(out: Path, given: Settings) -> Settings:
    """The settings to run with: `given` for a new sweep, written to sweep.json; for a sweep already in `out`, its
    own, after checking that `given` asks for the same sweep (the metric and direction may be decided now)."""
    if not (out / SETTINGS).is_file():
        write_settings(out, given)
        return given
    saved = read_settings(out)
    if problems := saved.conflicts(given, out):
        raise UserError(*problems)
    saved.trials, saved.time_budget = given.trials, given.time_budget
    saved.metric = saved.metric or given.metric
    saved.greater_is_better = (
        saved.greater_is_better if saved.greater_is_better is not None else given.greater_is_better
    )
    write_settings(out, saved)
    return saved


def read_settings(out: Path) -> Settings:
    path = out / SETTINGS
    try:
        data = json.loads(path.read_text())
        data.pop("written_by", None)
        return Settings(**data)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: not a sweep's settings ({e}); give another --output") from None


def write_settings(out: Path, settings: Settings) -> None:
    """sweep.json, replaced in one rename."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{SETTINGS}.tmp"
    tmp.write_text(json.dumps({"written_by": WRITER, **dataclasses.asdict(settings)}, indent=2) + "\n")
    tmp.replace(out / SETTINGS)


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold `out` for this sweep alone; the kernel lets go when the process ends, kill -9 included. A dir that holds
    files and no sweep is someone's: refused, and left as it is."""
    if out.is_file():
        raise UserError(f"--output {out}: a file; give a dir for the sweep")
    others = [p.name for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    if others and not (out / SETTINGS).is_file():
        raise UserError(f"--output {out}: holds files and no {SETTINGS} ({', '.join(sorted(others)[:3])}); "
                        "give a new or empty dir")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    with (out / LOCK).open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise UserError(f"--output {out}: another philora sweep runs there (pid {pid}); wait for it to end, "
                            "or give another --output") from None  # fmt: skip
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def open_study(out: Path, seed: int, startup_trials: int) -> Any:
    """The sweep's study, created or continued from its journal: TPE sampling (random for its first
    `startup_trials`) and median pruning once two trials have finished. The sampler's seed moves on with the trials
    already there, so that a continued sweep does not draw its first trials' values again."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(out / JOURNAL)))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    study = optuna.create_study(storage=storage, study_name=STUDY, direction="maximize", pruner=pruner,
                                load_if_exists=True)  # fmt: skip
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=startup_trials)
    return study


def retry_interrupted(study: Any) -> list[int]:
    """Trials a killed sweep left running: marked failed, their values queued to be tried again first. Returns
    their numbers."""
    from optuna.trial import TrialState

    left = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for t in left:
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return [t.number for t in left]
