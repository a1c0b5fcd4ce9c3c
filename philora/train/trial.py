"""`philora check --time`: a few real optimizer steps, the first ones the run would take on its own data and plan,
timed after a warm-up step; then, when the run evaluates, a few real answers to its eval prompts and an eval-loss
pass over a few eval samples; the whole run's time from them, in its parts (training, the answers before and after
training, the eval-loss passes)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from philora import progress
from philora.config import Config
from philora.data import PreparedData
from philora.preflight import schedule
from philora.preflight.report import Report, size
from philora.preflight.schedule import EPOCHS_FIX, MANY_EPOCHS
from philora.rundir import RunDir, read_records
from philora.train.run import train

STEPS = 3  # timed steps, after one warm-up step
ANSWERS = 4  # eval prompts answered to time the answer passes (at most one eval batch of them)
LOSS_SAMPLES = 8  # eval samples whose loss is timed


def measure(config: Config, prepared: PreparedData, report: Report) -> None:
    """Train STEPS + 1 steps into a scratch dir, time a few answers and an eval-loss pass with the model that trained;
    report tokens/s, the configured run's time in its parts, and the measured peak memory."""
    plan = run_plan(config, prepared)
    steps = trial_steps(config, plan.total_steps)
    parts = {"training": steps.seconds * plan.total_steps,
             **evaluation_parts(config, prepared, plan, steps.model, steps.mixed_precision)}  # fmt: skip
    total = sum(parts.values())
    report.facts["time"] = {"seconds_per_step": steps.seconds, "tokens_per_s": steps.tokens_per_s,
                            "steps": plan.total_steps, "eta_s": parts["training"], "total_s": total, "parts": parts,
                            "measured_peak_memory": steps.peak}  # fmt: skip
    prompts, passes = len(prompts_of(config, prepared)), loss_passes(config, prepared, plan)
    scored = f"{evaluations(config, plan)} × {scored_prompts(config, prepared)} prompts"
    counts = {"training": f"{plan.total_steps} steps", "answers_before": f"{prompts} prompts",
              "answers_during": scored, "answers_after": f"{prompts} prompts",
              "eval_loss": f"{passes} passes"}  # fmt: skip
    timed = f"{steps.timed} steps timed after a warm-up" if steps.warmed else "its one step timed"
    report.add("time", f"{timed}: {steps.seconds:.2f} s/step, "
               f"{steps.tokens_per_s:,.0f} tokens/s",
               f"the run: about {_duration(total)} in all",
               *[f"  {part.replace('_', ' '):<16}{counts[part]:>12}  {_duration(s) if s else '-':>8}"
                 for part, s in parts.items() if s or part != "answers_during"],
               f"measured peak memory of those steps: {size(steps.peak)}")  # fmt: skip
    answering = parts["answers_before"] + parts.get("answers_during", 0.0) + parts["answers_after"]
    if answering > total / 2:
        report.warnings.append(shorter_answers(config, prepared, answering, total))
    if (epochs := plan.epochs_done(plan.total_steps)) > MANY_EPOCHS:
        report.warnings.append(repeated_time(parts["training"], epochs))


@dataclass
class Steps:
    """What the trial's steps measured, and the model they trained (to time answers with)."""

    timed: int
    warmed: bool  # whether a warm-up step came first (a one-step run has none)
    seconds: float  # per step
    tokens_per_s: float
    peak: float  # bytes
    mixed_precision: str
    model: Any


def trial_steps(config: Config, total_steps: int) -> Steps:
    """The run's first STEPS + 1 steps, trained into a scratch dir that is gone when this returns."""
    trial = copy.deepcopy(config)
    tc = trial.training_config
    steps = min(STEPS + 1, total_steps)
    progress.say(f"check --time: timing the run's first {steps} optimizer step(s)")
    with tempfile.TemporaryDirectory(prefix="philora-check-") as scratch:
        tc.output_dir, tc.overwrite_output_dir, tc.max_steps = scratch, True, steps
        tc.logging_strategy, tc.logging_steps, tc.logging_first_step = "steps", 1, True
        tc.save_strategy, tc.eval_strategy, tc.do_eval, tc.predict_with_generate = "no", "no", False, False
        tc.report_to = "none"
        with scratch_run():
            model = train(trial).model
        records = [r for r in read_records(RunDir(Path(scratch)).metrics) if "loss" in r]
        record = json.loads((Path(scratch) / "run.json").read_text())
    # logged after every step with running totals: the warm-up step's record is the baseline
    base = records[0] if len(records) > 1 else {"elapsed_s": 0.0, "tokens": 0}
    timed = len(records) - 1 or 1
    seconds = (records[-1]["elapsed_s"] - base["elapsed_s"]) / timed
    tokens = (records[-1]["tokens"] - base["tokens"]) / timed
    return Steps(timed, len(records) > 1, seconds, tokens / seconds, record["peak_memory_mb"] * 1024**2,
                 record.get("mixed_precision", "no"), model)  # fmt: skip


@contextlib.contextmanager
def scratch_run() -> Iterator[None]:
    """The scratch run quiet and its stderr dropped: its data lines, warnings and memory estimate are the report's
    own already, and its last line would name a dir that is gone by the time anyone reads it."""
    before = progress.verbosity()
    progress.set_verbosity(progress.QUIET)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        progress.set_verbosity(before)


def evaluation_parts(config: Config, prepared: PreparedData, plan: Any, model: Any, mixed: str) -> dict[str, float]:
    """Seconds of the answers before, during (at each evaluation during training that scores them) and after
    training (the same pace for all: greedy answers to the same prompts) and of all the eval-loss passes, from a
    few of each timed on `model`, in the run's arithmetic."""
    from philora.eval import runner
    from philora.model.loss import TokenLoss

    tc = config.training_config
    prompts = prompts_of(config, prepared)
    samples = loss_samples(config, prepared)
    passes = loss_passes(config, prepared, plan)
    device = next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    answers = loss = during = 0.0
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        if prompts:
            questions = [(p, t) for p, _, t in prompts]
            few = questions[:: max(1, len(questions) // min(ANSWERS, tc.per_device_eval_batch_size))]
            few = few[: min(ANSWERS, tc.per_device_eval_batch_size)]
            runner.generate(model, prepared.encoder, few[:1], 2, 1)  # warm-up: the first answer pays one-time costs
            tick = time.perf_counter()
            runner.generate(model, prepared.encoder, few, tc.generation_max_length, tc.per_device_eval_batch_size)
            per_prompt = (time.perf_counter() - tick) / len(few)
            answers = per_prompt * len(prompts)
            during = per_prompt * scored_prompts(config, prepared) * evaluations(config, plan)
        if samples and passes:
            loss_fn, pad = TokenLoss(model), prepared.encoder.tokenizer.pad_token_id
            few_samples = samples[:LOSS_SAMPLES]
            runner.eval_loss(loss_fn, few_samples[:1], 1, pad, show=False)  # warm-up
            tick = time.perf_counter()
            runner.eval_loss(loss_fn, few_samples, tc.per_device_eval_batch_size, pad, show=False)
            per_token = (time.perf_counter() - tick) / sum(len(s.input_ids) for s in few_samples)
            loss = per_token * sum(len(s.input_ids) for s in samples) * passes
    return {"answers_before": answers, "answers_during": during, "answers_after": answers, "eval_loss": loss}


def scored_prompts(config: Config, prepared: PreparedData) -> int:
    """The eval prompts each evaluation during training answers (none when it scores no answers)."""
    tc = config.training_config
    if tc.eval_strategy == "no":
        return 0
    return len(prompts_of(config, prepared)[: tc.eval_generate_samples or None])


def evaluations(config: Config, plan: Any) -> int:
    """The evaluations the loop makes: per eval_strategy, and after the last step."""
    from philora.train.loop import due

    tc, total = config.training_config, plan.total_steps
    final = tc.do_eval or tc.eval_strategy != "no"
    every = tc.eval_steps or tc.logging_steps
    return sum(due(tc.eval_strategy, every, d, plan) or (d == total and final) for d in range(1, total + 1))


def prompts_of(config: Config, prepared: PreparedData) -> list[Any]:
    """The eval prompts the run answers before and after training; none when it does not."""
    from philora.eval import runner

    if not config.training_config.predict_with_generate or prepared.eval is None:
        return []
    return runner.prompts_and_references(prepared.eval.conversations, prepared.encoder)


def loss_samples(config: Config, prepared: PreparedData) -> list[Any]:
    """What an eval-loss pass reads: the eval samples, or both sides of each eval pair."""
    if prepared.eval is None:
        return []
    if config.training_config.method == "sft":
        return prepared.eval.samples
    return [side for pair in prepared.eval.pairs for side in pair]


def loss_passes(config: Config, prepared: PreparedData, plan: Any) -> int:
    """Eval-loss passes of the run: those the loop makes (per eval_strategy, and after the last step), and the
    base's and the fine-tuned model's in the final evaluation when the run answers its prompts."""
    if not loss_samples(config, prepared):
        return 0
    return evaluations(config, plan) + (2 if prompts_of(config, prepared) else 0)


def shorter_answers(config: Config, prepared: PreparedData, answering: float, total: float) -> str:
    """How to bring the answer passes under half the run: fewer eval prompts, or a shorter answer limit when the
    references are shorter than it."""
    tc, prompts = config.training_config, prompts_of(config, prepared)
    rest = total - answering
    fits = math.floor(len(prompts) * rest / answering)
    ways = [f"data.max_eval_samples: {fits} (now {len(prompts)} prompts)" if fits >= 1
            else "training_config.predict_with_generate: false"]  # fmt: skip
    longest = max((len(ids) for ids in prepared.encoder.tokenize([r for _, r, _ in prompts])), default=0)
    enough = math.ceil(longest * 1.25 / 16) * 16  # the longest reference answer, with room to spare
    if 0 < enough < tc.generation_max_length:
        ways.append(f"training_config.generation_max_length: {enough} (the longest reference answer is {longest} "
                    f"tokens; now {tc.generation_max_length})")  # fmt: skip
    return (f"time: answering the eval prompts before and after training takes {_duration(answering)} of the run's "
            f"{_duration(total)}; to shorten it set " + " or ".join(ways))  # fmt: skip


def repeated_time(training: float, epochs: float) -> str:
    """What a run of many epochs spends on data it has seen EPOCHS_FIX times already, where it learns little more."""
    repeated = training * (1 - EPOCHS_FIX / epochs)
    return (f"time: {_duration(repeated)} of the {_duration(training)} of training go over the data again after its "
            f"first {EPOCHS_FIX} passes ({epochs:.1f} in all), where the model learns little more; see the epochs "
            "warning above for the fix")  # fmt: skip


def run_plan(config: Config, prepared: PreparedData) -> Any:
    """The step plan of the configured run on one process, as the check's schedule makes it."""
    from philora.model.load import longrope_boundary
    from philora.preflight.architecture import model_config

    return schedule.train_plan(config, prepared, longrope_boundary(model_config(config)))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 48 * 3600 else f"{seconds / 86400:.1f} days"
