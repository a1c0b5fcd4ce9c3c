"""`philora sweep`: trials of `philora train` with values drawn from --set-range (Optuna's TPE), the ones going
nowhere stopped early (median pruning on the metric as each run logs it), until --trials have finished or
--time-budget has passed. Rerun with the same flags, it continues: a trial a kill left running is tried again.

The stages: the ranges and the base config checked (before any trial), the sweep dir and its study opened, the
trials run one at a time, and after each the results (sweep.md, sweep.html, best.yaml) rewritten.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from philora import progress
from philora.config import Config
from philora.errors import UserError
from philora.rundir import RunDir
from philora.sweep import best, metric, report, study, trial
from philora.sweep.report import trial_name
from philora.sweep.space import Range, check_space, parse_ranges, value_text

FAILURES_IN_A_ROW = 3  # then the sweep stops: the config or a range likely fails every trial
CONFIG_REFUSED = 2  # philora train's exit status for a user mistake


def main(args: argparse.Namespace, train: Sequence[str] | None = None, poll: float | None = None) -> int:
    """Run the sweep `args` asks for; `train` is the command each trial runs (default trial.TRAIN; tests give a
    stub), `poll` how often its metrics are read. Exit 0 when at least one trial has finished, 1 when none has."""
    _require_optuna()
    ranges = parse_ranges(args.ranges)
    budget = parse_budget(args.time_budget)
    if args.trials < 1:
        raise UserError(f"--trials {args.trials}: give at least 1")
    base = check_space(ranges, args.config, args.overrides)
    _require_eval_data(base, args.config)
    direction = args.greater_is_better
    if args.metric and direction is None:
        direction = metric.greater_is_better(args.metric)
    given = study.Settings(args.config, list(args.overrides), {r.key: r.canonical() for r in ranges}, args.metric,
                           direction, args.trials, args.time_budget)  # fmt: skip
    out = Path(args.output)
    _quiet_optuna()
    with study.locked(out):
        settings = study.prepare(out, given)
        opened = study.open_study(out, base.training_config.seed, startup_trials=max(2, args.trials // 3))
        sweep = Sweep(out, settings, ranges, base, opened, list(train or trial.TRAIN), poll or trial.POLL, budget)
        return sweep.run(study.retry_interrupted(opened))


@dataclass
class Sweep:
    """One run of the sweep's loop over its dir `out`."""

    out: Path
    settings: study.Settings
    ranges: list[Range]
    base: Config
    study: Any  # optuna.Study
    train: list[str]
    poll: float
    budget: float | None
    started: float = field(default_factory=time.monotonic)

    def run(self, retried: list[int]) -> int:
        self._say_plan(retried)
        self.write_results()
        failures = 0
        while (why := self._why_stop(failures)) is None:
            outcome = self.attempt()
            failures = failures + 1 if outcome.status == "failed" else 0
        progress.say(why)
        found = self.write_results()
        print(report.table(found, self.ranges, self.settings.metric or "value"), file=sys.stderr, end="")
        top = report.best(found)
        if top is not None:
            print(f"philora: best: {top.name}, {self.settings.metric} {top.value:.4g}; its config: {self.best_yaml}\n"
                  f"philora: train it: philora train --config {self.best_yaml}", file=sys.stderr)  # fmt: skip
        finished = self.finished()
        if not finished:
            logs = f"; their logs are in {self.out / 'logs'}" if found else ""
            print(f"philora: no trial finished{logs}", file=sys.stderr)
        return 0 if finished else 1

    @property
    def best_yaml(self) -> Path:
        return self.out / "best.yaml"

    def finished(self) -> int:
        return sum(t.state.name in ("COMPLETE", "PRUNED") for t in self.study.get_trials(deepcopy=False))

    def _why_stop(self, failures: int) -> str | None:
        if (done := self.finished()) >= self.settings.trials:
            return f"sweep done: {done} trials finished (--trials {self.settings.trials})"
        if self.budget is not None and time.monotonic() - self.started >= self.budget:
            return f"--time-budget {self.settings.time_budget} has passed: no new trial ({done} finished)"
        if failures >= FAILURES_IN_A_ROW:
            return f"sweep stopped: {failures} trials failed in a row; their logs are in {self.out / 'logs'}"
        return None

    def attempt(self) -> trial.Outcome:
        """Draw values, run the trial, tell the study how it went; the results rewritten."""
        asked = self.study.ask({r.key: r.distribution() for r in self.ranges})
        name = trial_name(asked.number)
        root, log = self.out / name, self.out / "logs" / f"{name}.log"
        sets = [f"{key}={value_text(value)}" for key, value in asked.params.items()]
        argv = trial.command_line(self.train, self.settings.config, self.settings.overrides,
                                  [*evaluation_sets(self.base, asked.params), *sets], root)  # fmt: skip
        progress.say(f"{name}: {' '.join(sets)}")
        reported: set[int] = set()

        def stop(records: list[dict[str, Any]]) -> bool:
            if self.settings.metric is None:  # decided when the first trial ends: nothing to compare with before
                return False
            self._report(asked, records, reported)
            return asked.should_prune()

        outcome = trial.run(argv, log, RunDir(root).metrics, stop, self.poll)
        self._finish(asked, outcome, root, log, reported)
        self.write_results()
        return outcome

    def _finish(self, asked: Any, outcome: trial.Outcome, root: Path, log: Path, reported: set[int]) -> None:
        """Read what the trial's run wrote, record it on the trial, and tell the study how it ended."""
        from optuna.trial import TrialState

        name = trial_name(asked.number)
        run, records = metric.read_run(root), metric.read_metrics(root)
        if outcome.status == "complete" and self.settings.metric is None:
            self._decide_metric(name, run, records)
        value = self._value(asked, outcome, run, records, reported)
        steps = (run or {}).get("steps") or max((r["step"] for r in records if isinstance(r.get("step"), int)),
                                                default=None)  # fmt: skip
        train_seconds = (run or {}).get("train_seconds") or next(
            (r["elapsed_s"] for r in reversed(records) if "elapsed_s" in r), None
        )
        attrs = {"value": value, "steps": steps, "train_seconds": train_seconds,
                 "wall_seconds": round(outcome.seconds, 2), "returncode": outcome.returncode,
                 "stopped_early": bool(((run or {}).get("selection") or {}).get("stopped_early"))}  # fmt: skip
        for key, attr in attrs.items():
            asked.set_user_attr(key, attr)
        if outcome.status == "complete":
            self.study.tell(asked, self._score(value))  # type: ignore[arg-type]
            progress.say(f"{name}: {self.settings.metric} {value:.4g} in {progress.duration(outcome.seconds)}")
        elif outcome.status == "pruned":
            self.study.tell(asked, state=TrialState.PRUNED)
            progress.say(f"{name}: pruned at step {max(reported, default=0)}, {self.settings.metric} {value:.4g} "
                         "(worse than the median of the trials before it there)")  # fmt: skip
        else:
            self.study.tell(asked, state=TrialState.FAIL)
            self._say_failure(name, outcome, log)

    def _value(self, asked: Any, outcome: trial.Outcome, run: dict[str, Any] | None, records: list[dict[str, Any]],
               reported: set[int]) -> float | None:  # fmt: skip
        """The trial's value (its last logged one, for a pruned trial); a finished run that logged none counts as
        failed. The intermediate values not reported yet are reported first: all of them, for the trial whose end
        chose the metric."""
        if self.settings.metric is None:
            return None
        self._report(asked, records, reported)
        if outcome.status == "pruned":
            return metric.last_logged(self.settings.metric, records)
        if outcome.status != "complete":
            return None
        value = metric.final_value(self.settings.metric, run, records)
        if value is None:
            outcome.status = "failed"
            asked.set_user_attr("error", f"no {self.settings.metric} logged")
            outcome.tail = [f"{trial_name(asked.number)}'s run logged no {self.settings.metric} (run.json's "
                            "selection or metrics.jsonl); check its eval data and --metric"]  # fmt: skip
        return value

    def _say_failure(self, name: str, outcome: trial.Outcome, log: Path) -> None:
        if outcome.returncode == 0:  # it ran to its end without a value to compare
            print(f"philora: warning: {name} failed: {' '.join(outcome.tail)}", file=sys.stderr)
            return
        lines = "".join(f"\n    {line}" for line in outcome.tail)
        print(f"philora: warning: {name} failed (exit {outcome.returncode}); the end of {log}:{lines}", file=sys.stderr)
        if outcome.returncode == CONFIG_REFUSED and not self.finished():
            self.write_results()
            errors = [line.removeprefix("philora: error: ") for line in outcome.tail if "error:" in line]
            raise UserError(*(f"{name}: {e}" for e in errors),
                            f"sweep stopped: philora train refused the first trial's config (exit 2, {log}); fix the "
                            "config or --set, then rerun")  # fmt: skip

    def _decide_metric(self, name: str, run: dict[str, Any] | None, records: list[dict[str, Any]]) -> None:
        chosen = metric.choose(run, records)
        self.settings.metric = chosen
        if self.settings.greater_is_better is None:
            self.settings.greater_is_better = metric.greater_is_better(chosen)
        study.write_settings(self.out, self.settings)
        why = "selected its adapter by" if (run or {}).get("selection") else "logged"
        way = "higher" if self.settings.greater_is_better else "lower"
        progress.say(f"trials are compared by {chosen} ({way} is better), which {name}'s run {why}; --metric "
                     "chooses another")  # fmt: skip

    def _score(self, value: float) -> float:
        """What the study maximises: the value, or its negative where lower is better."""
        return value if self.settings.greater_is_better else -value

    def _report(self, asked: Any, records: list[dict[str, Any]], reported: set[int]) -> None:
        name = self.settings.metric
        for r in records:
            step, value = r.get("step"), r.get(name)
            # step 0: the starting model's answers, the same for every trial: nothing to compare
            if isinstance(step, int) and step > 0 and isinstance(value, (int, float)) and step not in reported:
                asked.report(self._score(float(value)), step)
                reported.add(step)

    def write_results(self) -> list[report.Row]:
        """sweep.md, sweep.html and best.yaml (once a trial completed), each replaced whole."""
        greater = self.settings.greater_is_better is not False
        name = self.settings.metric or "value"
        found = report.rows(self.study.get_trials(deepcopy=False), greater)
        top = report.best(found)
        command = f"philora train --config {self.best_yaml}" if top is not None else None
        report.write_markdown(self.out / "sweep.md", found, self.ranges, name, greater)
        report.write_html(self.out / "sweep.html", found, self.ranges, name, greater, command)
        if top is not None:
            self._write_best(top)
        return found

    def _write_best(self, top: report.Row) -> None:
        where = f"over {self.settings.config}" if self.settings.config else "over the embedded demo"
        header = [
            f"The best trial of `philora sweep` in {self.out} ({where}): {top.name}, {self.settings.metric} "
            f"{top.value:.4g} ({'higher' if self.settings.greater_is_better else 'lower'} is better).",
            f"Train it: philora train --config {self.best_yaml}",
        ]
        trial_sets = {key: value_text(value) for key, value in top.params.items()}
        sweep_sets = dict(s.split("=", 1) for s in evaluation_sets(self.base, top.params))
        text = best.best_config(self.settings.config, self.settings.overrides, sweep_sets, trial_sets,
                                self.out / "best", header)  # fmt: skip
        tmp = self.best_yaml.with_name(".best.yaml.tmp")
        tmp.write_text(text)
        tmp.replace(self.best_yaml)

    def _say_plan(self, retried: list[int]) -> None:
        keys = ", ".join(r.key for r in self.ranges)
        done = self.finished()
        progress.say(f"sweep: {self.settings.trials} trials over {keys} into {self.out}"
                     + (f" ({done} finished before)" if done else ""))  # fmt: skip
        if retried:
            names = ", ".join(trial_name(n) for n in retried)
            progress.say(f"{names}: left running by a stopped sweep; their values are tried again first")
        tc = self.base.training_config
        swept = {r.key for r in self.ranges}
        if tc.eval_strategy == "no" and "training_config.eval_strategy" not in swept:
            if "training_config.max_steps" in swept:
                every = "ceil(max_steps / 3) steps"
            else:
                every = f"{math.ceil(tc.max_steps / 3)} steps" if tc.max_steps > 0 else "epoch"
            progress.say(f"training_config.eval_strategy is no: each trial evaluates every {every}, so that one going "
                         "nowhere can be stopped early")  # fmt: skip


def evaluation_sets(base: Config, params: dict[str, Any]) -> list[str]:
    """The evaluation a trial adds where the config has none during training (eval_strategy no): three times a run
    (every ceil(max_steps / 3) steps), else once per epoch; the values pruning compares."""
    tc = base.training_config
    if tc.eval_strategy != "no" or "training_config.eval_strategy" in params:
        return []
    steps = params.get("training_config.max_steps", tc.max_steps)
    if steps > 0:
        return ["training_config.eval_strategy=steps", f"training_config.eval_steps={math.ceil(steps / 3)}"]
    return ["training_config.eval_strategy=epoch"]


UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_budget(text: str | None) -> float | None:
    """--time-budget: seconds (`900`), or with a unit (`90s`, `30m`, `2h`, `1.5h`)."""
    if text is None:
        return None
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not found or float(found[1]) <= 0:
        raise UserError(f"--time-budget {text}: expected seconds or a duration such as 900, 30m or 2h")
    return float(found[1]) * UNITS[found[2]]


def _require_eval_data(config: Config, given: str | None) -> None:
    """Trials are compared on held-out data: a config without any would give every trial no value."""
    if config.data.eval is None and config.data.train is not None:
        where = given or "the config"
        raise UserError(f"{where}: data.eval: none, and a sweep compares trials on eval data; set data.eval (a file, "
                        "or a fraction of train such as 0.1), e.g. --set data.eval=0.1")  # fmt: skip


def _require_optuna() -> None:
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise UserError("philora sweep needs optuna; pip install 'philora[sweep]' (or pip install optuna)")


def _quiet_optuna() -> None:
    """Optuna's own lines (a trial finished, pruned) repeat the sweep's: kept for -v."""
    import optuna

    level = optuna.logging.INFO if progress.verbosity() == progress.VERBOSE else optuna.logging.WARNING
    optuna.logging.set_verbosity(level)
