"""The state of a training run, as dataclasses whose fields you can read: `Progress` (what a checkpoint saves of
the loop's position) and `Run` (what the stages of `philora train` share)."""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from philora import data, progress
from philora.config import Config, TrainingSection
from philora.rundir import RunDir
from philora.train.metrics import MetricsLog
from philora.train.selection import Selection

if TYPE_CHECKING:
    from philora.train.checkpoint import Checkpoint


@dataclass
class Window:
    """Sums since the last log line (saved too, so a resumed run logs the values an uninterrupted one logs)."""

    loss: float = 0.0
    tokens: int = 0
    trained: int = 0
    seconds: float = 0.0
    units: int = 0  # what the loss is a sum over: trained tokens (sft), pairs (dpo, orpo)
    stats: dict[str, float] = field(default_factory=dict)  # sums of the objective's statistics (dpo, orpo)


@dataclass
class Progress:
    """Where the run stands: what a checkpoint's state.json holds under "progress"."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens seen, padding excluded
    trained_tokens: int = 0  # tokens with a label
    train_seconds: float = 0.0  # time in optimizer steps (no evaluation, no checkpointing)
    window: Window = field(default_factory=Window)
    selection: Selection = field(default_factory=Selection)  # the best evaluation so far, early stopping's count

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Progress:
        known = {f.name for f in dataclasses.fields(cls)} - {"window", "selection"}
        return cls(**{k: v for k, v in saved.items() if k in known}, window=Window(**(saved.get("window") or {})),
                   selection=Selection(**(saved.get("selection") or {})))  # fmt: skip


@dataclass
class Run:
    """What the stages of one training run share; filled in as they go."""

    config: Config
    accelerator: Any
    files: RunDir
    resume_from: Checkpoint | None = None  # the checkpoint being resumed, read and checked at set-up
    started: float = field(default_factory=time.time)
    tokenizer: Any = None
    prepared: data.PreparedData | None = None
    prompts: list[tuple[list[dict[str, Any]], str]] = field(default_factory=list)  # eval prompts and references
    model: Any = None  # the peft model
    initial_adapter: str | None = None  # PiSSA/OLoRA: the adapter as initialised, to convert the trained one
    plan: Any = None
    optimizer: Any = None
    scheduler: Any = None
    loss_fn: Any = None  # the objective's loss module (TokenLoss or PreferenceLoss), as accelerate prepared it
    objective: Any = None  # train.objective: units, batches and loss of training_config.method
    eval_objective: Any = None  # dpo, orpo: the eval pairs' objective, for their preference metrics
    final_pair_eval: dict[str, float] | None = None  # those metrics after the last step, if the loop measured them
    log: MetricsLog | None = None
    progress: Progress = field(default_factory=Progress)
    metric: str | None = None  # the eval metric that selects (None: the run does not evaluate during training)
    best_weights: dict[str, Any] | None = None  # with load_best_model_at_end: the best evaluation's adapter weights

    @property
    def tc(self) -> TrainingSection:
        return self.config.training_config

    @property
    def eval_samples(self) -> list[data.Sample]:
        """What eval loss is measured on: every eval sample (sft), or the chosen side of each eval pair."""
        if self.prepared is None or self.prepared.eval is None:
            return []
        if self.tc.method == "sft":
            return self.prepared.eval.samples
        return [chosen for chosen, _ in self.prepared.eval.pairs]

    @property
    def main(self) -> bool:
        """The process that writes files and talks to the user (the only one, outside data-parallel runs)."""
        return self.accelerator.is_main_process

    def say(self, text: str, *, result: bool = False) -> None:
        """A message to the user, from the main process only; -q keeps notices to itself, not results or warnings."""
        if self.main and (result or progress.verbosity() > progress.QUIET):
            print(f"philora: {text}", file=sys.stderr)

    @property
    def generates(self) -> bool:
        """Whether the run answers its eval prompts before and after training (the main process does)."""
        return self.tc.predict_with_generate and bool(self.prompts) and self.main
