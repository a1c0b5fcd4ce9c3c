"""`philora check --time`: a few real optimizer steps, the first ones the run would take on its own data and plan,
timed after a warm-up step, and the whole run's time from them."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

from philora.config import Config
from philora.data import PreparedData
from philora.preflight.report import Report, size
from philora.rundir import RunDir, read_records
from philora.train.run import train

STEPS = 3  # timed steps, after one warm-up step


def measure(config: Config, prepared: PreparedData, report: Report) -> None:
    """Train STEPS + 1 steps into a scratch dir; report tokens/s, the ETA of the configured run, the measured peak."""
    trial = copy.deepcopy(config)
    tc = trial.training_config
    total_steps = planned_steps(config, prepared)
    with tempfile.TemporaryDirectory(prefix="philora-check-") as scratch:
        tc.output_dir, tc.overwrite_output_dir, tc.max_steps = scratch, True, min(STEPS + 1, total_steps)
        tc.logging_strategy, tc.logging_steps, tc.logging_first_step = "steps", 1, True
        tc.save_strategy, tc.eval_strategy, tc.do_eval, tc.predict_with_generate = "no", "no", False, False
        tc.report_to = "none"
        train(trial)
        records = [r for r in read_records(RunDir(Path(scratch)).metrics) if "loss" in r]
        peak = json.loads((Path(scratch) / "run.json").read_text())["peak_memory_mb"] * 1024**2
    # logged after every step with running totals: the warm-up step's record is the baseline
    base = records[0] if len(records) > 1 else {"elapsed_s": 0.0, "tokens": 0}
    timed = len(records) - 1 or 1
    seconds = (records[-1]["elapsed_s"] - base["elapsed_s"]) / timed
    tokens = (records[-1]["tokens"] - base["tokens"]) / timed
    eta = seconds * total_steps
    report.facts["time"] = {"seconds_per_step": seconds, "tokens_per_s": tokens / seconds, "steps": total_steps,
                            "eta_s": eta, "measured_peak_memory": peak}  # fmt: skip
    report.add("time", f"{timed} steps timed after a warm-up: {seconds:.2f} s/step, "
               f"{tokens / seconds:,.0f} tokens/s",
               f"the run: {total_steps} steps, about {_duration(eta)}",
               f"measured peak memory of those steps: {size(peak)}")  # fmt: skip


def planned_steps(config: Config, prepared: PreparedData) -> int:
    """The optimizer steps the configured run would take on one process."""
    from philora.data.batching import row_width
    from philora.model.load import longrope_boundary
    from philora.preflight.architecture import model_config
    from philora.train.objective import make_objective
    from philora.train.plan import make_plan

    tc, dc = config.training_config, config.data
    lengths = make_objective(prepared, tc.method, dc.max_length).lengths
    width = row_width(tc.method, dc.max_length)
    plan = make_plan(lengths, tc, width, dc.packing, 1, 0, longrope_boundary(model_config(config)))
    return plan.total_steps


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 48 * 3600 else f"{seconds / 86400:.1f} days"
