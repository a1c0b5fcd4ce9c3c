"""Progress and talk (#34): a log line every half minute with its ETA, nothing for a short phase, -q/-v on every
command, the pad notice once and never before an error, train's data report in one line (whole in the run dir), and
`check --time` estimating the whole run in its parts without naming its scratch dir."""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from philora import cli, progress
from philora.model import load
from philora.progress import Phase
from tests.conftest import tiny_config


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def normal_verbosity() -> Iterator[None]:
    load.notice.cache_clear()  # each test is a fresh process for the notices
    yield
    progress.set_verbosity(progress.NORMAL)
    load.notice.cache_clear()


def test_a_log_gets_a_line_every_half_minute_with_done_total_elapsed_and_eta() -> None:
    clock, log = Clock(), io.StringIO()
    with Phase("answers after training", 40, "prompt", stream=log, clock=clock, tick=None) as phase:
        clock.now = 10.0
        phase.update(10)
        assert log.getvalue() == ""  # not half a minute yet
        clock.now = 65.0
        phase.update(14)
        assert log.getvalue() == "philora: answers after training: 24/40 prompts, 1m05s, about 43s left\n"
        clock.now = 80.0
        phase.update(6)  # 15 s after the last line: none
        clock.now = 110.0
        phase.update(10)
    assert log.getvalue().splitlines()[1:] == [
        "philora: answers after training: 40/40 prompts, 1m50s",
        "philora: answers after training: 40 prompts in 1m50s",
    ]


def test_a_resumed_phase_counts_its_pace_from_where_it_started() -> None:
    clock, log = Clock(), io.StringIO()
    with Phase("training", 100, "step", initial=50, stream=log, clock=clock, tick=None) as phase:
        clock.now = 40.0
        phase.set_postfix(loss="1.234")
        phase.update(10)  # 10 steps in 40 s: 40 more steps take 160 s
    assert log.getvalue().splitlines() == [
        "philora: training: 60/100 steps, 40s, about 2m40s left (loss 1.234)",
        "philora: training: 10 steps in 40s",
    ]


def test_a_short_phase_says_nothing_in_a_log_or_on_a_terminal() -> None:
    clock = Clock()
    for stream in (io.StringIO(), Terminal()):
        with Phase("eval loss", 6, "sample", stream=stream, clock=clock, tick=None) as phase:
            clock.now += 3.0
            phase.update(6)
        assert stream.getvalue() == ""


def test_quiet_silences_notices_and_bars(capsys: pytest.CaptureFixture[str]) -> None:
    clock, log, terminal = Clock(), io.StringIO(), Terminal()
    progress.set_verbosity(progress.QUIET)
    for stream in (log, terminal):
        with Phase("training", 10, "step", leave=True, stream=stream, clock=clock, tick=None) as phase:
            clock.now += 60.0
            phase.update(5)
            phase.write("step 5: eval loss 1.0")
            clock.now += 60.0
            phase.update(5)
    progress.say("a notice")
    load.notice("pad token '<|im_end|>' is the end-of-sequence token")
    assert log.getvalue() == terminal.getvalue() == "" and capsys.readouterr().err == ""
    progress.set_verbosity(progress.NORMAL)  # the bar is there without -q
    with Phase("training", 10, "step", leave=True, stream=terminal, clock=clock, tick=None) as phase:
        phase.update(10)
    assert "training: 100%" in terminal.getvalue()


@pytest.mark.parametrize("argv", [["-q", "config"], ["config", "-q"], ["config", "--quiet"], ["-v", "config"],
                                  ["config", "--verbose"], ["data", "check", "x.jsonl", "-q"],
                                  ["export", "gguf", "--output", "x.gguf", "-v"]])  # fmt: skip
def test_every_command_takes_q_and_v_before_or_after_its_name(argv: list[str]) -> None:
    expected = progress.QUIET if {"-q", "--quiet"} & set(argv) else progress.VERBOSE
    assert cli.parser().parse_args(argv).verbosity == expected
    assert not hasattr(cli.parser().parse_args(["config"]), "verbosity")  # main() reads that as normal


def test_tokenising_shows_its_progress(
    tiny_phi3: Path, tiny_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from philora import data
    from philora.config import DataSection, ModelSection

    monkeypatch.setattr(progress, "SHORT", 0.0)
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    tokenizer = load.load_tokenizer(ModelSection(name_or_path=str(tiny_phi3)), say_pad=False)
    data.prepare(DataSection(train=str(tiny_data[0]), cache=False), tokenizer, seed=0)
    err = capsys.readouterr().err
    assert "philora: tokenising: 24/24 conversations" in err and "philora: tokenising: 24 conversations in" in err


def test_reading_a_large_jsonl_shows_its_progress_in_megabytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from philora.data.sources import read_source

    row = json.dumps({"messages": [{"role": "user", "content": "x" * 1000}, {"role": "assistant", "content": "y"}]})
    big = tmp_path / "big.jsonl"
    big.write_text((row + "\n") * 3000)  # 3.1 MB
    monkeypatch.setattr(progress, "SHORT", 0.0)
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    source = read_source(str(big), "train", 1 << 20)
    assert len(source.parts[0].rows) == 3000
    lines = [line for line in capsys.readouterr().err.splitlines() if "reading big.jsonl" in line]
    assert "philora: reading big.jsonl: 1/3 megabytes" in lines[0] and "about" in lines[0], lines
    assert lines[-1].startswith("philora: reading big.jsonl: 3 megabytes in "), lines


def train(capsys: pytest.CaptureFixture[str], config: Path, out: Path, *flags: str) -> str:
    assert cli.main(["train", *flags, "--config", str(config), "--output", str(out)]) == 0
    return capsys.readouterr().err


def test_train_reports_its_data_in_one_line_and_in_full_in_the_run_dir(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tmp_path, tiny_phi3, tiny_data, max_steps=2, eval_steps=2, generation_max_length=2)
    out = tmp_path / "run"
    err = train(capsys, config, out)
    lines = [line for line in err.splitlines() if line.startswith("philora: data:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("philora: data: train 24 rows (messages) → 24 samples, 3,806 tokens, length p50 ")
    assert "(max_length 512; none cut); eval 6 rows (messages) → 6 samples" in lines[0]
    assert lines[0].endswith(f"; 0 rows rejected (in full: {out / 'data-report.txt'})")
    report = (out / "data-report.txt").read_text()
    assert "one sample, trained tokens inside ⟦ ⟧:" in report and "train: 24 conversations → 24 samples" in report
    assert "data-report.txt" in json.loads((out / "manifest.json").read_text())["files"]
    assert err.count("pad token '<|im_end|>' is the end-of-sequence token") == 1
    assert err.index("philora: data:") < err.index("pad token") < err.index("memory: one step")

    err = train(capsys, config, tmp_path / "verbose", "-v", "--set", "training_config.overwrite_output_dir=true")
    shown = "\n".join(line.removeprefix("philora: data: ") for line in err.splitlines() if "philora: data:" in line)
    assert shown == (tmp_path / "verbose" / "data-report.txt").read_text().rstrip("\n")


def test_quiet_train_says_only_warnings_and_results(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tmp_path, tiny_phi3, tiny_data, max_steps=2, eval_steps=2, generation_max_length=2)
    err = train(capsys, config, tmp_path / "run", "-q")
    for notice in ("philora: data:", "pad token", "memory:", "LoRA on", "step 2: eval loss", "Loading weights"):
        assert notice not in err, (notice, err)
    assert "held-out eval, 6 prompts" in err and "philora: done in" in err


def test_the_pad_notice_is_not_said_before_a_data_error(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    config = tiny_config(tmp_path, tiny_phi3, tiny_data)
    assert cli.main(["train", "--config", str(config), "--output", str(tmp_path / "run"), "--set",
                     f"data.train={bad}"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert f"philora: error: {bad}:1: not valid JSON" in err and "pad token" not in err, err


def test_check_time_estimates_the_whole_run_in_parts_and_names_no_scratch_dir(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from philora.train import trial

    config = str(tiny_config(tmp_path, tiny_phi3, tiny_data, max_steps=1, eval_steps=1, generation_max_length=8))
    assert cli.main(["check", "--config", config, "--time"]) == 0
    out, err = capsys.readouterr()
    scratch = str(Path(tempfile.gettempdir()) / "philora-check-")
    assert scratch not in out + err and "done in" not in err and "adapter in" not in out + err
    lines = out.splitlines()
    section = [line.strip() for line in lines[next(i for i, line in enumerate(lines) if line.startswith("time ")) :]]
    assert section[1].startswith("the run: about ") and section[1].endswith(" in all")
    assert [line.split()[:2] for line in section[2:7]] == [["training", "1"], ["answers", "before"],
                                                           ["answers", "during"], ["answers", "after"],
                                                           ["eval", "loss"]]  # fmt: skip
    assert "6 prompts" in section[3] and "1 × 6 prompts" in section[4]  # one evaluation during training scores all
    assert "3 passes" in section[6]  # after the step, then base and fine-tuned

    # answers that take most of the run: the check says how to shorten them
    slow = {"answers_before": 100.0, "answers_after": 100.0, "eval_loss": 1.0}
    monkeypatch.setattr(trial, "evaluation_parts", lambda *args: slow)
    long_answers = ["--set", "training_config.generation_max_length=256"]
    assert cli.main(["check", "--config", config, "--time", "--json", *long_answers]) == 0
    out, err = capsys.readouterr()
    timed = json.loads(out)["time"]
    assert timed["parts"] == {"training": timed["eta_s"], **slow}
    assert timed["total_s"] == pytest.approx(sum(timed["parts"].values()))
    assert (
        "philora: warning: time: answering the eval prompts before and after training takes 3 min of the run's " in err
    )
    # the longest reference answer of the tiny eval data is 41 tokens: 64 leaves room
    assert "training_config.generation_max_length: 64 (the longest reference answer is 41 tokens; now 256)" in err

    # many passes over the data: the check says how much of the training time goes to passes past the third
    assert cli.main(["check", "--config", config, "--time", "--json", "--set", "training_config.max_steps=400"]) == 0
    out, err = capsys.readouterr()
    timed, epochs = json.loads(out)["time"], json.loads(out)["plan"]["epochs"]
    repeated = trial.repeated_time(timed["eta_s"], epochs)
    assert epochs > 5 and f"philora: warning: {repeated}" in err
    assert trial.repeated_time(100.0, 10.0).startswith("time: 70 s of the 100 s of training go over the data again")
