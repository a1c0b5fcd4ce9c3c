"""The first-config story of issue #34, end to end on the embedded model: a newcomer's CSV of date conversions with
columns `question` and `answer`, a config with only the data paths (and the column mapping `data check` hands over)
and `max_steps`, then `philora init` on the same files.

With the defaults of a user's own config the run evaluates (eval data given) and prints the starting model beside
the tuned one; the check warns when the step count means many epochs; the config `philora init` writes learns more
than the minimal one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from philora import cli, hardware
from tests.test_init import make_dates


def exact_match(run: Path) -> tuple[float, float]:
    evaluation = json.loads((run / "eval.json").read_text())
    return evaluation["before"]["exact_match"], evaluation["after"]["exact_match"]


@pytest.mark.slow
def test_a_minimal_config_evaluates_and_init_does_better(
    tmp_path: Path, embedded_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_dates(tmp_path, 120, 20)
    monkeypatch.chdir(tmp_path)
    # as the demo test: bf16 only where the CPU computes it natively (emulated bf16 is ~25x slower)
    dtype = "bfloat16" if hardware.cpu_detects_bf16() else "float32"
    (tmp_path / "minimal.yaml").write_text(
        "data:\n  train: dates.csv\n  eval: dates-eval.csv\n  columns: {prompt: question, completion: answer}\n"
        f"model:\n  dtype: {dtype}\ntraining_config:\n  max_steps: 40\n  output_dir: out/minimal\n"
    )

    # the story's row length (the old default, 2048): 40 packed steps are many passes over 120 short rows
    assert cli.main(["check", "--config", "minimal.yaml", "--set", "data.max_length=2048"]) == 0
    out, err = capsys.readouterr()
    assert "epochs" in err and "max_steps" in err, err
    assert "all clear" not in out
    # with the data's own row length, the same 40 steps are about one pass: nothing to warn about
    assert cli.main(["check", "--config", "minimal.yaml"]) == 0
    out, err = capsys.readouterr()
    assert "epochs" not in err, err

    assert cli.main(["train", "--config", "minimal.yaml"]) == 0
    err = capsys.readouterr().err
    table = next(line.split() for line in err.splitlines() if line.strip().startswith("exact match"))
    minimal = exact_match(tmp_path / "out" / "minimal")
    assert table[2:4] == [f"{100 * minimal[0]:.1f}%", f"{100 * minimal[1]:.1f}%"]  # base beside tuned

    assert cli.main(["init", "dates.csv", "--eval", "dates-eval.csv", "--output", "init.yaml"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--config", "init.yaml", "--set", f"model.dtype={dtype}"]) == 0
    started = exact_match(tmp_path / "out" / "dates")
    assert started[0] == minimal[0]  # the same starting model and prompts
    assert started[1] > minimal[1], (minimal, started)
