"""`philora sweep`: the ranges read and refused, and whole sweeps over a stub in place of `philora train` (a script
that writes metrics.jsonl and run.json as a run does, its value following the values drawn, with sleeps), so that
the study, pruning, resuming after kill -9, failures and best.yaml are tested in seconds without training."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from philora import cli
from philora.config import load_config
from philora.errors import UserError
from philora.sweep import command, space, study

needs_optuna = pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="philora[sweep] not installed")

# Stands in for `philora train`: reads the --set values it is given, and does what STUB_PLAN says for its Nth
# invocation (counted in STUB_COUNTER): good (three evaluations, then run.json with its selection), bad (a poor
# first evaluation, then a long wait: a trial to prune), slow (good, with long steps: a trial to kill the sweep in),
# fail (a crash, exit 1), refuse (a config error, exit 2). Its value peaks at learning_rate 1e-3.
STUB = r"""
import json, math, os, sys, time
from pathlib import Path

argv = sys.argv[1:]
sets = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
counter = Path(os.environ["STUB_COUNTER"])
n = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(n + 1))
plan = json.loads(os.environ.get("STUB_PLAN", "[]"))
what = plan[n] if n < len(plan) else "good"
Path(os.environ["STUB_COUNTER"] + f".pid{n}").write_text(str(os.getpid()))
out = Path(sets["training_config.output_dir"])
out.mkdir(parents=True, exist_ok=True)
print("stub trial", n, what, json.dumps({"sets": sets, "quiet": argv[-1] == "-q"}), flush=True)
if what == "fail":
    print("Traceback (most recent call last):\nRuntimeError: boom", flush=True)
    sys.exit(1)
if what == "refuse":
    print("philora: error: --set training_config.learning_rate=x: expected a number", flush=True)
    sys.exit(2)
value = -(math.log10(float(sets.get("training_config.learning_rate", "1e-3"))) + 3) ** 2
value += int(sets.get("peft_config.r", "0")) / 1000
pause = {"slow": 1.0}.get(what, 0.05)
with (out / "metrics.jsonl").open("a") as f:
    for step in (1, 2, 3):
        time.sleep(pause)
        score = -100.0 if what == "bad" else value - (3 - step) * 0.1
        f.write(json.dumps({"step": step, "loss": 1.0 / step, "elapsed_s": step * pause}) + "\n")
        f.write(json.dumps({"step": step, "eval_loss": 1.0, "eval_score": score}) + "\n")
        f.flush()
        if what == "bad":
            time.sleep(60)
selection = {"metric": "eval_score", "greater_is_better": True, "best_step": 3, "best_value": value,
             "adapter_step": 3, "adapter_value": value, "stopped_early": False}
(out / "run.json").write_text(json.dumps({"steps": 3, "train_seconds": 3 * pause, "wall_seconds": 3 * pause + 0.1,
                                          "selection": selection}))
"""


@pytest.fixture
def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The command trials run in place of philora train; STUB_PLAN set per test."""
    script = tmp_path / "stub_train.py"
    script.write_text(STUB)
    monkeypatch.setenv("STUB_COUNTER", str(tmp_path / "counter"))
    monkeypatch.delenv("STUB_PLAN", raising=False)
    return [sys.executable, str(script)]


LR = "training_config.learning_rate=1e-5:1e-1:log"


def sweep(argv: list[str], train: list[str], capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str]:
    """`philora sweep ARGV` as the CLI runs it, with `train` for trials: exit status and stderr."""
    args = cli.parser().parse_args(["sweep", *argv])
    try:
        status = command.main(args, train=train, poll=0.05)
    except UserError as e:
        for problem in e.problems:
            print(f"philora: error: {problem}", file=sys.stderr)
        status = 2
    return status, capsys.readouterr().err if capsys else ""


def trials(out: Path) -> list[Any]:
    return study.open_study(out, 0, 2).get_trials()


# --- the ranges -------------------------------------------------------------------------------------------------


def test_ranges_of_every_form() -> None:
    lr = space.parse_range("training_config.learning_rate=1e-5:1e-3:log")
    assert (lr.low, lr.high, lr.log, lr.integer, lr.choices) == (1e-5, 1e-3, True, False, None)
    steps = space.parse_range("training_config.max_steps=20:80")
    assert (steps.low, steps.high, steps.log, steps.integer) == (20, 80, False, True)
    assert isinstance(steps.low, int) and steps.canonical() == "20:80"
    # a fraction stays a fraction though its ends are written as whole numbers
    warmup = space.parse_range("training_config.warmup_ratio=0:1")
    assert not warmup.integer and isinstance(warmup.low, float)
    r = space.parse_range("peft_config.r=[8,16,32]")
    assert r.choices == (8, 16, 32) and r.canonical() == "[8, 16, 32]"
    mixed = space.parse_range("training_config.lr_scheduler_type=[cosine, linear]")
    assert mixed.choices == ("cosine", "linear")
    assert space.parse_range("training_config.eval_steps=5:10:log").integer  # int | None: whole numbers


@needs_optuna
def test_ranges_become_optuna_distributions() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    assert space.parse_range(LR).distribution() == FloatDistribution(1e-5, 1e-1, log=True)
    assert space.parse_range("training_config.max_steps=20:80").distribution() == IntDistribution(20, 80)
    assert space.parse_range("peft_config.r=[8,16]").distribution() == CategoricalDistribution([8, 16])


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("training_config.learnin_rate=1e-5:1e-3:log", "no such key; did you mean training_config.learning_rate?"),
        ("training_config.nothing_like_it=1:2", "no such key; `philora config` lists every key"),
        ("trainin_config.max_steps=1:2", "no such key; did you mean training_config.max_steps?"),
        ("learning_rate=1:2", "expected KEY=SPEC, e.g. training_config.learning_rate=1e-5:1e-3:log"),
        ("training_config.learning_rate", "expected KEY=SPEC"),
        ("training_config.learning_rate=1e-3", "expected LOW:HIGH, LOW:HIGH:log or [a,b,c]"),
        ("training_config.learning_rate=1e-5:1e-3:ln", "expected LOW:HIGH, LOW:HIGH:log or [a,b,c]"),
        ("training_config.learning_rate=1e-3:1e-5", "LOW must be below HIGH, e.g. training_config.learning_rate="),
        ("training_config.warmup_ratio=0:0.2:log", "a log range needs LOW > 0; drop :log, or start above 0"),
        ("training_config.learning_rate=small:1", "'small' is not a number"),
        ("peft_config.r=4.5:64", "peft_config.r takes whole numbers; give whole ends, e.g. peft_config.r=8:64"),
        (
            "training_config.lr_scheduler_type=1:2",
            "training_config.lr_scheduler_type is not a number; give its choices",
        ),
        ("peft_config.r=[]", "expected a list of values like [8,16,32]"),
        ("peft_config.r=[8, [16]]", "each choice must be one value"),
        ("peft_config.r=[8, 8]", "a choice is listed twice"),
        ("training_config.output_dir=[a,b]", "the sweep sets training_config.output_dir for each trial itself"),
    ],
)
def test_a_bad_range_is_one_line_naming_the_flag_and_the_fix(item: str, message: str) -> None:
    with pytest.raises(UserError) as e:
        space.parse_range(item)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(f"--set-range {item}: ")
    assert message in e.value.problems[0]


def test_every_bad_range_is_told_at_once() -> None:
    with pytest.raises(UserError) as e:
        space.parse_ranges(["peft_config.r=[8,16]", "training_config.learnin_rate=1:2", "peft_config.r=4:8"])
    assert e.value.problems == [
        "--set-range training_config.learnin_rate=1:2: no such key; did you mean training_config.learning_rate?",
        "--set-range peft_config.r=4:8: peft_config.r is swept twice; give one --set-range per key",
    ]


def test_values_the_config_refuses_are_named_by_their_range() -> None:
    ranges = space.parse_ranges(["training_config.max_steps=0:10", "peft_config.lora_dropout=0.1:0.3"])
    with pytest.raises(UserError) as e:
        space.check_space(ranges, None, ["peft_config.lora_dropout=0.2"])
    assert e.value.problems == [
        "--set-range training_config.max_steps=0:10: 0 is not allowed; use -1 (derive from epochs) or >= 1",
        "--set-range peft_config.lora_dropout=0.1:0.3: --set peft_config.lora_dropout=0.2 sets the same key; drop "
        "one of them",
    ]
    choices = space.parse_ranges(["training_config.lr_scheduler_type=[cosine, sawtooth]"])
    with pytest.raises(UserError) as e:
        space.check_space(choices, None, [])
    assert e.value.problems[0].startswith(
        "--set-range training_config.lr_scheduler_type=[cosine, sawtooth]: expected one of linear, cosine"
    )


def test_time_budget_and_a_config_without_eval_data(tmp_path: Path, stub: list[str]) -> None:
    assert command.parse_budget("900") == 900 and command.parse_budget("30m") == 1800
    assert command.parse_budget("1.5h") == 5400 and command.parse_budget("45s") == 45
    with pytest.raises(UserError, match=r"^--time-budget 3x: expected seconds or a duration such as 900, 30m or 2h"):
        command.parse_budget("3x")
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    status, _ = sweep(["--set", f"data.train={data}", "--set-range", LR, "--output", str(tmp_path / "s")], stub)
    assert status == 2 and not (tmp_path / "s").exists()


# --- whole sweeps over the stub -----------------------------------------------------------------------------------


@needs_optuna
def test_the_sweep_finds_the_best_and_writes_a_config_that_trains_it(
    tmp_path: Path, stub: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    argv = ["--set-range", LR, "--set-range", "peft_config.r=[4,16]", "--set", "training_config.max_steps=9",
            "--trials", "6", "--output", str(out)]  # fmt: skip
    status, err = sweep(argv, stub, capsys)
    assert status == 0
    done = trials(out)
    assert len(done) == 6 and all(t.state.name in ("COMPLETE", "PRUNED") for t in done)
    complete = [t for t in done if t.state.name == "COMPLETE"]
    top = max(complete, key=lambda t: t.user_attrs["value"])
    lr, r = top.params["training_config.learning_rate"], top.params["peft_config.r"]
    assert top.user_attrs["value"] == pytest.approx(-((math.log10(lr) + 3) ** 2) + r / 1000)
    # the metric came from the first run's run.json (no --metric), its direction from its name
    settings = json.loads((out / "sweep.json").read_text())
    assert (settings["metric"], settings["greater_is_better"]) == ("eval_score", True)
    assert "trials are compared by eval_score (higher is better)" in err
    # each trial was told its dir, the sweep's evaluation (demo: eval_strategy no, max_steps 9 -> every 3 steps)
    told = json.loads((out / "logs" / "trial-000.log").read_text().splitlines()[0].removeprefix("stub trial 0 good "))
    params = ("training_config.learning_rate", "peft_config.r")
    assert told["quiet"] and {k: v for k, v in told["sets"].items() if k not in params} == {
        "training_config.max_steps": "9",
        "training_config.eval_strategy": "steps",
        "training_config.eval_steps": "3",
        "training_config.output_dir": str(out / "trial-000"),
        "training_config.overwrite_output_dir": "true",
    }
    assert float(told["sets"]["training_config.learning_rate"]) == done[0].params["training_config.learning_rate"]
    best = load_config(str(out / "best.yaml"))
    assert best.training_config.learning_rate == lr and best.peft_config.r == r
    assert (best.training_config.eval_strategy, best.training_config.eval_steps) == ("steps", 3)
    assert best.training_config.max_steps == 9 and best.training_config.output_dir == str(out / "best")
    text = (out / "best.yaml").read_text()
    assert "  # [philora sweep: the best trial] peak learning rate" in text
    assert f"# The best trial of `philora sweep` in {out} (over the embedded demo): trial-{top.number:03d}" in text
    assert "do_eval: null" in text  # auto stays auto
    assert f"philora: train it: philora train --config {out / 'best.yaml'}" in err
    table = (out / "sweep.md").read_text()
    first = next(line for line in table.splitlines() if line.startswith("| 1 "))
    assert f"trial-{top.number:03d}" in first and "complete" in first
    page = (out / "sweep.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "http" not in page.split("</head>")[1]


@needs_optuna
def test_no_trial_starts_once_the_time_budget_has_passed(
    tmp_path: Path, stub: list[str], capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "sweep"
    argv = ["--set-range", LR, "--trials", "5", "--time-budget", "0.01", "--output", str(out)]
    status, err = sweep(argv, stub, capsys)
    assert status == 1 and trials(out) == []  # 10 ms pass before the first trial could start
    assert "philora: --time-budget 0.01 has passed: no new trial (0 finished)\n" in err
    assert err.endswith("philora: no trial finished\n")


@needs_optuna
def test_a_metric_the_run_did_not_select_by_is_read_from_its_log(
    tmp_path: Path, stub: list[str], capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "sweep"
    assert sweep(["--set-range", LR, "--trials", "1", "--metric", "eval_loss", "--output", str(out)], stub)[0] == 0
    assert trials(out)[0].user_attrs["value"] == 1.0  # the stub's last eval_loss; its run selected by eval_score
    assert json.loads((out / "sweep.json").read_text())["greater_is_better"] is False
    # a metric no trial logs: each fails, saying so, and three in a row stop the sweep
    other = tmp_path / "other"
    status, err = sweep(["--set-range", LR, "--metric", "eval_nothing", "--output", str(other)], stub, capsys)
    assert status == 1 and [t.state.name for t in trials(other)] == ["FAIL"] * 3
    assert "trial-000's run logged no eval_nothing (run.json's selection or metrics.jsonl); check its eval data" in err
    assert f"philora: sweep stopped: 3 trials failed in a row; their logs are in {other / 'logs'}\n" in err


@needs_optuna
def test_a_trial_going_nowhere_is_pruned(tmp_path: Path, stub: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUB_PLAN", json.dumps(["good", "good", "bad"]))
    out = tmp_path / "sweep"
    started = time.monotonic()
    status, _ = sweep(["--set-range", LR, "--trials", "3", "--output", str(out)], stub)
    assert status == 0 and time.monotonic() - started < 30  # the bad trial would sleep for 60 s
    pruned = trials(out)[2]
    assert pruned.state.name == "PRUNED" and pruned.user_attrs["value"] == -100.0
    assert pruned.user_attrs["steps"] == 1 and pruned.intermediate_values == {1: -100.0}
    assert "pruned" in (out / "sweep.md").read_text()


@needs_optuna
@pytest.mark.parametrize("plan", [["good", "fail", "good"], ["good", "refuse", "good"]])
def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(
    plan: list[str], tmp_path: Path, stub: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("STUB_PLAN", json.dumps(plan))
    out = tmp_path / "sweep"
    status, err = sweep(["--set-range", LR, "--trials", "2", "--output", str(out)], stub, capsys)
    assert status == 0
    assert [t.state.name for t in trials(out)] == ["COMPLETE", "FAIL", "COMPLETE"]
    code = 1 if plan[1] == "fail" else 2
    assert f"philora: warning: trial-001 failed (exit {code}); the end of {out / 'logs' / 'trial-001.log'}:\n" in err
    assert ("    RuntimeError: boom" if code == 1 else "    philora: error: --set training_config") in err
    assert f"failed (exit {code})" in (out / "sweep.md").read_text()


@needs_optuna
def test_a_config_the_first_trial_refuses_stops_the_sweep(
    tmp_path: Path, stub: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("STUB_PLAN", json.dumps(["refuse"]))
    out = tmp_path / "sweep"
    status, err = sweep(["--set-range", LR, "--trials", "3", "--output", str(out)], stub, capsys)
    assert status == 2
    assert "philora: error: trial-000: --set training_config.learning_rate=x: expected a number\n" in err
    assert err.endswith(f"philora: error: sweep stopped: philora train refused the first trial's config (exit 2, "
                        f"{out / 'logs' / 'trial-000.log'}); fix the config or --set, then rerun\n")  # fmt: skip
    assert [t.state.name for t in trials(out)] == ["FAIL"]


@needs_optuna
def test_a_rerun_with_other_ranges_is_refused(tmp_path: Path, stub: list[str], capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sweep"
    assert sweep(["--set-range", LR, "--trials", "1", "--output", str(out)], stub, capsys)[0] == 0
    journal = (out / study.JOURNAL).read_bytes()
    other = "training_config.learning_rate=1e-4:1e-2:log"
    status, err = sweep(["--set-range", other, "--trials", "2", "--output", str(out)], stub, capsys)
    assert status == 2 and (out / study.JOURNAL).read_bytes() == journal
    assert err == (
        f"philora: error: --set-range {other.replace('1e-4', '0.0001').replace('1e-2', '0.01')}: {out} holds a "
        f"sweep with --set-range training_config.learning_rate=1e-05:0.1:log; use another --output for a new "
        f"sweep, or the flags {out} was swept with to continue it\n"
    )
    # the same ranges, written another way, continue it
    assert sweep(["--set-range", "training_config.learning_rate=0.00001:0.1:log", "--trials", "2", "--output",
                  str(out)], stub)[0] == 0  # fmt: skip
    assert len(trials(out)) == 2


def test_a_dir_that_is_no_sweep_is_left_alone(tmp_path: Path, stub: list[str], capsys: pytest.CaptureFixture) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    status, err = sweep(["--set-range", LR, "--output", str(mine)], stub, capsys)
    assert status == 2 and [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (
        err == f"philora: error: --output {mine}: holds files and no sweep.json (notes.txt); give a new or empty dir\n"
    )


RUNNER = """
import sys
from philora import cli
from philora.sweep import trial
trial.TRAIN, trial.POLL = (sys.executable, sys.argv[1]), 0.05
sys.exit(cli.main(sys.argv[2:]))
"""


@needs_optuna
def test_a_sweep_killed_mid_trial_tries_that_trial_again(
    tmp_path: Path, stub: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 during the second trial: its process ends with the sweep's, and the rerun marks it failed, tries its
    values again first and finishes as many trials as --trials says, in all."""
    monkeypatch.setenv("STUB_PLAN", json.dumps(["good", "slow", "good", "good"]))
    out = tmp_path / "sweep"
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    argv = ["sweep", "--set-range", LR, "--trials", "3", "--output", str(out)]
    sweeping = subprocess.Popen([sys.executable, str(runner), stub[1], *argv], stderr=subprocess.PIPE)
    metrics = out / "trial-001" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert sweeping.poll() is None and time.monotonic() < deadline, sweeping.stderr.read()  # type: ignore[union-attr]
        time.sleep(0.05)
    os.kill(sweeping.pid, signal.SIGKILL)
    sweeping.wait()
    sweeping.stderr.close()  # type: ignore[union-attr]
    orphan = int((tmp_path / "counter.pid1").read_text())
    while time.monotonic() < deadline and _alive(orphan):
        time.sleep(0.05)
    assert not _alive(orphan), "the trial outlived the sweep"
    before = trials(out)
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]
    rerun = subprocess.run([sys.executable, str(runner), stub[1], *argv], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "philora: trial-001: left running by a stopped sweep; their values are tried again first" in rerun.stderr
    after = trials(out)
    assert [t.state.name for t in after] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert after[2].user_attrs["retry_of"] == 1 and after[2].params == before[1].params
    table = (out / "sweep.md").read_text()
    assert "interrupted (the sweep was stopped; tried again as trial-002)" in table


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead: its parent (killed) left it to init, which reaps it soon
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text() if Path(f"/proc/{pid}").exists() else False


@needs_optuna
def test_best_yaml_keeps_relative_data_paths_working(
    tmp_path: Path, stub: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config's data beside it, and --set data typed from the working dir: best.yaml, elsewhere, finds both."""
    data = tmp_path / "cfg"
    data.mkdir()
    line = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    (data / "train.jsonl").write_text(line)
    (data / "eval.jsonl").write_text(line)
    config = data / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": "train.jsonl"}, "training_config": {"max_steps": 6}}))
    monkeypatch.chdir(tmp_path)
    out = Path("sweeps/one")
    status, _ = sweep(["--config", str(config), "--set", "data.eval=cfg/eval.jsonl", "--set-range", LR, "--trials",
                       "1", "--output", str(out)], stub)  # fmt: skip
    assert status == 0
    best = load_config(str(out / "best.yaml"))
    assert best.data.train == str(data / "train.jsonl") and best.data.eval == str(data / "eval.jsonl")
