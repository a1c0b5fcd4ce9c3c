"""The run's schedule as `philora check` sees it: steps, epochs and tokens per step from the plan training makes, and
the warnings about a schedule that cannot learn well: the data repeated many times, held-out data nobody uses, a
step that holds the whole training set, more held-out answers than are worth their time. Each warning is a pure
function of the numbers, with its fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from philora import data
from philora.config import Config, TrainingSection
from philora.preflight.report import Report


@dataclass(frozen=True)
class Schedule:
    """The planned run in the numbers its warnings need, from the plan training makes (train/plan.py)."""

    steps: int  # optimizer steps
    steps_per_epoch: float  # below 1 when one step holds more than the whole training set
    dataset_tokens: int  # the training units' tokens (samples, or both sides of preference pairs)
    width: int  # tokens a row holds: data.max_length, twice it for a preference pair

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch

    @property
    def tokens_per_step(self) -> int:
        """On average: an epoch's tokens over its steps (padding excluded)."""
        return round(self.dataset_tokens / self.steps_per_epoch)


def plan(config: Config, prepared: data.PreparedData, long_after: int | None) -> Schedule:
    """The schedule of the configured run on one process, from the same objective and plan `philora train` makes."""
    lengths, made, width = _planned(config, prepared, long_after)
    return Schedule(made.total_steps, made.per_epoch / made.accumulation, sum(lengths), width)


def train_plan(config: Config, prepared: data.PreparedData, long_after: int | None) -> Any:
    """The step plan (train/plan.py's Plan) of the configured run on one process."""
    return _planned(config, prepared, long_after)[1]


def _planned(config: Config, prepared: data.PreparedData, long_after: int | None) -> tuple[list[int], Any, int]:
    """The training units' lengths, the plan train makes of them, and the row width."""
    # train's planning is pure (no model, no optimizer) and imports nothing from here; imported when used, so that
    # importing the check does not import training
    from philora.data.batching import row_width
    from philora.train.objective import make_objective
    from philora.train.plan import make_plan

    tc, dc = config.training_config, config.data
    assert dc.max_length is not None  # data.prepare resolved it
    lengths = make_objective(prepared, tc.method, dc.max_length).lengths
    width = row_width(tc.method, dc.max_length)
    return lengths, make_plan(lengths, tc, width, dc.packing, 1, 0, long_after), width


def describe(config: Config, prepared: data.PreparedData, schedule: Schedule, report: Report) -> None:
    """The plan's line and facts, and the warnings it calls for."""
    tc = config.training_config
    report.add("plan", f"{schedule.steps:,} optimizer steps of about {schedule.tokens_per_step:,} tokens: "
               f"{schedule.epochs:.1f} epochs of the {schedule.dataset_tokens:,} training tokens")  # fmt: skip
    report.facts["plan"] = {"steps": schedule.steps, "epochs": round(schedule.epochs, 3),
                            "tokens_per_step": schedule.tokens_per_step,
                            "dataset_tokens": schedule.dataset_tokens}  # fmt: skip
    given_eval = config.data.eval is not None and prepared.eval is not None
    answered = len(prepared.eval.conversations) if prepared.eval is not None and tc.predict_with_generate else 0
    found = (repeats_data(schedule, tc), eval_unused(given_eval, tc), step_holds_everything(schedule, tc),
             many_answers(answered, config.data.max_eval_samples), preference_rate(tc))  # fmt: skip
    report.warnings += [w for w in found if w is not None]


MANY_EPOCHS = 5  # past this many passes a small dataset is memorised more than learned
EPOCHS_FIX = 3  # what the warning suggests instead: transformers' default, and philora's


def repeats_data(schedule: Schedule, tc: TrainingSection) -> str | None:
    """The run goes over the training data more than MANY_EPOCHS times."""
    if schedule.epochs <= MANY_EPOCHS:
        return None
    steps = max(1, round(EPOCHS_FIX * schedule.steps_per_epoch))
    if tc.max_steps > 0:
        cause = f"training_config.max_steps: {tc.max_steps}"
        fix = (f"set max_steps: -1 and num_train_epochs: {EPOCHS_FIX} ({steps:,} steps), or fewer max_steps, or "
               "give more data")  # fmt: skip
    else:
        cause = f"training_config.num_train_epochs: {tc.num_train_epochs:g}"
        fix = f"set num_train_epochs: {EPOCHS_FIX} ({steps:,} steps), or give more data"
    return (f"{cause}: {schedule.steps:,} steps of about {schedule.tokens_per_step:,} tokens go over the "
            f"{schedule.dataset_tokens:,} training tokens {schedule.epochs:.1f} times (epochs); data seen this often "
            f"is memorised rather than learned, and the run takes longer; {fix}")  # fmt: skip


def eval_unused(given_eval: bool, tc: TrainingSection) -> str | None:
    """Held-out data is given (and read) but nothing evaluates on it."""
    if not given_eval or tc.predict_with_generate or tc.do_eval or tc.eval_strategy != "no":
        return None
    return ("data.eval: the held-out data is read but never used: training_config.predict_with_generate and do_eval "
            "are false and eval_strategy is no; set predict_with_generate: true (answers before and after training, "
            "scored) or do_eval: true (the eval loss), or remove data.eval")  # fmt: skip


def step_holds_everything(schedule: Schedule, tc: TrainingSection) -> str | None:
    """One optimizer step holds the whole training set or more: every step sees the same data, and an epoch is at
    most one update."""
    if schedule.steps_per_epoch > 1:
        return None
    return (f"training_config.per_device_train_batch_size: {tc.per_device_train_batch_size} with "
            f"gradient_accumulation_steps: {tc.gradient_accumulation_steps} (rows of up to {schedule.width:,} tokens): "
            f"one optimizer step holds about {schedule.tokens_per_step:,} tokens, as much as the whole training set "
            f"({schedule.dataset_tokens:,} tokens) or more, so every step sees all of it; lower "
            "per_device_train_batch_size or gradient_accumulation_steps (or data.max_length) for more, smaller "
            "steps")  # fmt: skip


MANY_ANSWERS = 500  # held-out prompts answered twice; past this the answers can take longer than training
ANSWERS_FIX = 200  # what the warning suggests: exact match measured to a few points, in minutes


def many_answers(prompts: int, limit: int | None) -> str | None:
    """Every one of many held-out conversations is answered before and after training."""
    if prompts <= MANY_ANSWERS or limit is not None:
        return None
    return (f"data.eval: all {prompts:,} held-out conversations are answered twice, before and after training, which "
            f"can take longer than the training; set data.max_eval_samples: {ANSWERS_FIX} (exact match to within a "
            "few points), or predict_with_generate: false; `philora check --time` measures it")  # fmt: skip


PREFERENCE_RATE = 1e-4  # above this a preference loss on LoRA tends to undo what SFT taught (README, DPO)


def preference_rate(tc: TrainingSection) -> str | None:
    """A dpo/orpo run at an SFT learning rate."""
    if tc.method == "sft" or tc.learning_rate <= PREFERENCE_RATE:
        return None
    return (f"training_config.learning_rate: {tc.learning_rate:g} with method {tc.method}: a preference loss moves "
            "the model much further per step than SFT's, and at SFT's rates it tends to undo what SFT taught (on "
            "the demo's DPO 1e-4 lowered held-out exact match and 5e-4 took it to 0%); LoRA preference tuning "
            "usually trains at 5e-6 to 5e-5: set learning_rate: 5.0e-5 or lower")  # fmt: skip
