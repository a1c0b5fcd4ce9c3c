"""Defaults that fit a config of your own (#34): where every value came from, evaluation when eval data is given,
max_length from the data, the check's warnings about the schedule, and missing data paths reported before anything
slow loads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import SAMPLE, write_yaml

from philora import cli, data
from philora.config import PACKAGED_CONFIGS, DataSection, ModelSection, load_config
from philora.config.fields import SECTIONS
from philora.data import lengths
from philora.data.encode import Outcome
from philora.data.formats import Conversation
from philora.data.render import Sample
from philora.errors import UserError
from philora.model.load import load_tokenizer
from philora.preflight import schedule


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith(text))


# --- origins ---------------------------------------------------------------------------------------------------


def test_every_value_says_where_it_came_from(tmp_path: Path) -> None:
    demo = load_config()
    assert demo.origin("data.max_length") == f"demo.yaml:{line_of(PACKAGED_CONFIGS / 'demo.yaml', 'max_length:')}"
    assert demo.origin("model.revision") == "default"
    mine = write_yaml(tmp_path / "dates.yaml", "data:\n  train: /data/dates.csv\ntraining_config:\n  max_steps: 40\n")
    config = load_config(str(mine), ["training_config.seed=3"], flags=[("--output", "training_config.output_dir", "o")])
    assert config.origin("training_config.max_steps") == f"{mine}:4"
    assert config.origin("training_config.seed") == "--set"
    assert config.origin("training_config.output_dir") == "--output" and config.training_config.output_dir == "o"
    assert config.origin("training_config.learning_rate") == "default"
    # origins are not settings: run.json and a checkpoint's comparison see the same four sections as before
    assert list(config.to_dict()) == list(SECTIONS) and "origins" not in json.dumps(config.to_dict())


def test_a_flag_is_named_as_typed_in_its_errors(tmp_path: Path) -> None:
    mine = write_yaml(tmp_path / "c.yaml", "training_config: {}\n")
    with pytest.raises(UserError) as e:
        load_config(str(mine), flags=[("--output", "training_config.output_dir", ["not", "a", "path"])])
    assert e.value.problems[0].startswith("--output: training_config.output_dir: expected a string")


def test_philora_config_shows_values_origins_and_meanings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "demo preset" in out[0] and "philora/configs/demo.yaml" in out[0]
    assert "your own starts from the defaults" in out[1] and "[default]" in out[1]
    row = next(line for line in out if line.startswith("  learning_rate:"))
    assert f"[demo.yaml:{line_of(PACKAGED_CONFIGS / 'demo.yaml', 'learning_rate:')}] peak learning rate" in row
    mine = write_yaml(tmp_path / "mine.yaml", "data:\n  train: /data/x.jsonl\n")
    assert cli.main(["config", "--config", str(mine), "--set", "training_config.seed=3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert not any("demo preset" in line for line in out)
    rows = {line.split(":")[0].strip(): line for line in out if line.startswith("  ")}
    assert "max_length: null" in rows["max_length"]
    assert "[auto (p99 of the training data, known once it is read)]" in rows["max_length"]
    assert "[--set]" in rows["seed"] and "[default]" in rows["learning_rate"] and f"[{mine}:2]" in rows["train"]
    assert (
        "predict_with_generate: false" in rows["predict_with_generate"]
        and "[auto (no data.eval)]" in rows["predict_with_generate"]
    )


# --- evaluation when there is eval data ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data_section", "expected"),
    [
        ("{train: /d/train.jsonl, eval: /d/eval.jsonl}", True),
        ("{train: /d/train.jsonl, eval: 0.1}", True),
        ("{train: null}", True),  # the sample data and its eval split
        ("{train: /d/train.jsonl}", False),
    ],
)
def test_evaluation_follows_eval_data(tmp_path: Path, data_section: str, expected: bool) -> None:
    config = load_config(str(write_yaml(tmp_path / "c.yaml", f"data: {data_section}\n")))
    tc = config.training_config
    # sft's answers after training report the eval loss of both models: no second loss pass of its own
    assert tc.predict_with_generate is expected and tc.do_eval is False
    assert config.origin("training_config.do_eval").startswith("auto (")
    dpo = load_config(str(tmp_path / "c.yaml"), ["training_config.method=dpo"]).training_config
    assert dpo.do_eval is expected  # the preference loss on held-out pairs is dpo's evaluation


def test_explicit_evaluation_settings_are_kept(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", "data: {train: /d/t.jsonl, eval: /d/e.jsonl}\ntraining_config:\n"
                      "  predict_with_generate: false\n  do_eval: false\n")  # fmt: skip
    tc = load_config(str(path)).training_config
    assert tc.predict_with_generate is False and tc.do_eval is False
    with pytest.raises(UserError, match=r"training_config.predict_with_generate: needs eval data"):
        load_config(str(path), ["data.eval=null", "training_config.predict_with_generate=true"])


# --- max_length follows the data ---------------------------------------------------------------------------


def test_auto_length_is_the_p99_rounded_up_and_capped() -> None:
    assert lengths.choose([10] * 99 + [1000], 4096).length == 64  # the one outlier does not set every row
    assert lengths.choose(list(range(1, 201)), 4096) == lengths.LengthChoice(256, 198, 4096, 200)
    assert lengths.choose([5000] * 10, lengths.cap(131072)).length == 4096  # a 128k model does not get 128k rows
    assert lengths.choose([900] * 10, lengths.cap(512)).length == 512
    assert lengths.cap(None) == lengths.cap(10**30) == 4096  # a tokenizer with no limit says 1e30


def made_up_data(path: Path) -> Path:
    """100 questions with answers of 1 to 20 words, and one answer of 400 words."""
    rows = [{"prompt": f"Question {i}?", "completion": " ".join(["word"] * (1 + i % 20))} for i in range(99)]
    rows.append({"prompt": "Tell me everything.", "completion": " ".join(["long"] * 400)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_auto_length_on_the_tiny_model(tmp_path: Path, tiny_phi3: Path, capsys: pytest.CaptureFixture) -> None:
    path = made_up_data(tmp_path / "made_up.jsonl")
    tokenizer = load_tokenizer(ModelSection(name_or_path=str(tiny_phi3)), say_pad=False)
    whole = data.prepare(DataSection(train=str(path), max_length=1024), tokenizer, 0)
    measured = sorted(len(s.input_ids) for s in whole.train.samples)
    p99 = measured[98]
    expected = math.ceil(p99 / 64) * 64
    dc = DataSection(train=str(path))
    prepared = data.prepare(dc, tokenizer, 0, context=1024)
    assert dc.max_length == expected and prepared.length is not None and prepared.length.p99 == p99
    assert prepared.length.cut == 1 == prepared.train.count("truncated") == sum(n > expected for n in measured)
    assert max(len(s.input_ids) for s in prepared.train.samples) == expected  # the long one, cut
    # what fits comes out as the encoding with a set length gives it
    assert all(np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
               for a, b in zip(whole.train.samples[:99], prepared.train.samples[:99], strict=True))  # fmt: skip
    line = prepared.length.describe("truncate")
    assert line.startswith(f"max_length {expected} (auto: p99 of the training data, {p99} tokens over 100 samples")
    assert "1 longer conversations handled per data.overlong: truncate" in line
    capped = DataSection(train=str(path))
    data.prepare(capped, tokenizer, 0, context=48)  # the model's context bounds it
    assert capped.max_length == 48
    # `philora data check` goes through the same choice and says so
    config = write_yaml(tmp_path / "c.yaml", f"model: {{name_or_path: {tiny_phi3}}}\n")
    assert cli.main(["data", "check", str(path), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"data: max_length {expected} (auto: p99 of the training data" in out
    assert f"(max_length {expected})" in out and "1 truncated" in out


def tiny_run(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], **training: object) -> Path:
    settings = {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 0.01, "save_steps": 2,
                "logging_steps": 1, "generation_max_length": 4, "seed": 7, **training}  # fmt: skip
    lines = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in settings.items())
    return write_yaml(tmp_path / "tiny.yaml", f"model: {{name_or_path: {tiny_phi3}, dtype: float32}}\n"
                      f"data: {{train: {tiny_data[0]}, eval: {tiny_data[1]}, max_eval_samples: 2}}\n"
                      f"peft_config: {{r: 4, lora_alpha: 8}}\ntraining_config:\n{lines}\n")  # fmt: skip


def test_check_and_train_resolve_the_length_and_resume_is_not_refused(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    config = str(tiny_run(tmp_path, tiny_phi3, tiny_data))
    assert cli.main(["check", "--config", config, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    length = report["data"]["max_length"]
    assert length["auto"] and length["value"] % 64 == 0 and length["value"] <= 1024  # tiny_phi3's context
    assert report["plan"]["steps"] == 3
    out = tmp_path / "run"
    assert cli.main(["train", "--config", config, "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"data: max_length {length['value']} (auto: p99 of the training data" in err
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["data"]["max_length"] == length["value"]
    assert run["config"]["training_config"]["predict_with_generate"] is True  # auto: data.eval is set
    assert (out / "eval.json").is_file()  # the before/after table was made
    # the checkpoint recorded the chosen length; the file still says null
    assert cli.main(["train", "--config", config, "--output", str(out), "--resume"]) == 0
    assert "resume with the same settings" not in capsys.readouterr().err


# --- the check's warnings ---------------------------------------------------------------------------------


def prepared_of(sample_lengths: list[int]) -> data.PreparedData:
    """Training data of samples of these token lengths, for the plan alone."""
    records = [data.Record(Conversation("x"), Outcome([Sample.of(list(range(n)), [(1, n)])]))
               for n in sample_lengths]  # fmt: skip
    encoder = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0))
    return data.PreparedData(data.Split(records), None, encoder, [])  # type: ignore[arg-type]


def story(tmp_path: Path, rows: int = 200, **settings: object) -> tuple[schedule.Schedule, object]:
    """The issue's first config: data paths and max_steps: 40, with the defaults of the time (max_length 2048,
    batch 4, no evaluation) on 200 date conversations of 12,014 tokens."""
    text = "data: {train: /d/dates.csv, eval: /d/held_out.csv, max_length: 2048}\ntraining_config:\n  max_steps: 40\n"
    text += "".join(f"  {k}: {json.dumps(v)}\n" for k, v in settings.items())
    config = load_config(str(write_yaml(tmp_path / "dates.yaml", text)))
    sizes = [60] * rows
    if rows == 200:
        sizes[:14] = [61] * 14  # 12,014 tokens
    return schedule.plan(config, prepared_of(sizes), None), config.training_config


def test_the_story_repeats_its_data_and_is_warned(tmp_path: Path) -> None:
    found, tc = story(tmp_path)
    assert found.dataset_tokens == 12014 and found.steps == 40
    warning = schedule.repeats_data(found, tc)  # type: ignore[arg-type]
    assert warning is not None and warning.startswith("training_config.max_steps: 40: 40 steps of about")
    assert f"{found.epochs:.1f} times" in warning and found.epochs > 15
    assert "num_train_epochs: 3" in warning and "fewer max_steps" in warning
    found, tc = story(tmp_path, max_steps=-1)  # the new default: 3 epochs
    assert schedule.repeats_data(found, tc) is None and found.epochs == pytest.approx(3, abs=0.5)  # type: ignore[arg-type]


def test_eval_data_nobody_uses_is_warned(tmp_path: Path) -> None:
    _, tc = story(tmp_path, predict_with_generate=False, do_eval=False)  # the story's resolved values
    warning = schedule.eval_unused(True, tc)  # type: ignore[arg-type]
    assert warning is not None and warning.startswith("data.eval: the held-out data is read but never used")
    _, tc = story(tmp_path)  # today: auto evaluates
    assert schedule.eval_unused(True, tc) is None  # type: ignore[arg-type]
    _, tc = story(tmp_path, predict_with_generate=False, do_eval=False, eval_strategy="steps")
    assert schedule.eval_unused(True, tc) is None  # type: ignore[arg-type]


def test_a_step_that_holds_the_whole_dataset_is_warned(tmp_path: Path) -> None:
    found, tc = story(tmp_path, rows=50)  # the story's settings on 50 of its rows: 3,000 tokens, steps of 8,192
    warning = schedule.step_holds_everything(found, tc)  # type: ignore[arg-type]
    assert warning is not None and "per_device_train_batch_size: 4 with gradient_accumulation_steps: 1" in warning
    assert "as much as the whole training set (3,000 tokens)" in warning
    found, tc = story(tmp_path, gradient_accumulation_steps=4)  # 4 micro-batches of 4 rows: more than 12,014 tokens
    assert found.tokens_per_step > found.dataset_tokens
    assert schedule.step_holds_everything(found, tc) is not None  # type: ignore[arg-type]
    found, tc = story(tmp_path)
    assert schedule.step_holds_everything(found, tc) is None  # type: ignore[arg-type]


def test_the_demo_config_is_not_warned(embedded_tokenizer: Path) -> None:
    from transformers import AutoTokenizer

    config = load_config("demo")
    tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer)  # the embedded model's, without its conversion
    prepared = data.prepare(config.data, tokenizer, 0)
    found = schedule.plan(config, prepared, None)
    tc = config.training_config
    assert found.epochs < 1 and found.steps == 70
    assert schedule.repeats_data(found, tc) is None and schedule.step_holds_everything(found, tc) is None
    assert schedule.eval_unused(prepared.eval is not None, tc) is None
    assert schedule.many_answers(len(prepared.eval.conversations), config.data.max_eval_samples) is None


def test_a_preference_run_at_an_sft_rate_is_warned() -> None:
    from philora.config import TrainingSection

    warning = schedule.preference_rate(TrainingSection(method="dpo"))  # the default rate, 2e-4: SFT's
    assert warning is not None and warning.startswith("training_config.learning_rate: 0.0002 with method dpo")
    assert "set learning_rate: 5.0e-5 or lower" in warning
    assert schedule.preference_rate(TrainingSection(method="dpo", learning_rate=5e-5)) is None
    assert schedule.preference_rate(TrainingSection(method="orpo", learning_rate=1e-3)) is not None
    assert schedule.preference_rate(TrainingSection()) is None  # sft
    assert schedule.preference_rate(load_config("demo-dpo").training_config) is None


def test_thousands_of_held_out_answers_are_warned() -> None:
    warning = schedule.many_answers(5000, None)
    assert warning is not None and warning.startswith("data.eval: all 5,000 held-out conversations are answered twice")
    assert "data.max_eval_samples: 200" in warning and "predict_with_generate: false" in warning
    assert schedule.many_answers(5000, 5000) is None  # chosen: the user set the limit
    assert schedule.many_answers(400, None) is None and schedule.many_answers(0, None) is None


def test_the_check_warns_about_many_answers_with_the_default_evaluation(tmp_path: Path) -> None:
    from philora.preflight.report import Report

    config = load_config(str(write_yaml(tmp_path / "big.yaml", "data: {train: /d/t.csv, eval: /d/e.csv}\n")))
    train = prepared_of([60] * 200)
    prepared = data.PreparedData(train.train, prepared_of([60] * 600).train, train.encoder, [])
    config.data.max_length = 64  # as data.prepare resolves it
    report = Report()
    schedule.describe(config, prepared, schedule.plan(config, prepared, None), report)
    assert config.training_config.predict_with_generate  # auto: there is eval data
    assert [w for w in report.warnings if w.startswith("data.eval: all 600 held-out conversations")], report.warnings


# --- missing data, before anything slow ---------------------------------------------------------------------


def no_tokenizer(*args: object, **kwargs: object) -> None:
    raise AssertionError("the tokenizer loaded before the data paths were checked")


def test_missing_data_is_reported_before_the_tokenizer_loads(
    tmp_path: Path, tiny_phi3: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_tokenizer)  # whichever command loads it, however
    monkeypatch.chdir(tmp_path)
    gone = tmp_path / "gone" / "dates.csv"
    config = write_yaml(tmp_path / "dates.yaml", f"model: {{name_or_path: {tiny_phi3}}}\ndata: {{train: {gone}}}\n")
    assert cli.main(["check", "--config", str(config)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"philora: error: {config}:2: data.train: {gone}: no such file or folder (tried {gone})"
    ]
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--output", str(out), "--set", "data.eval=held_out.csv"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"philora: error: {config}:2: data.train: {gone}: no such file or folder (tried {gone})"
    assert err[1] == (
        f"philora: error: --set: data.eval: held_out.csv: no such file or folder (tried {tmp_path / 'held_out.csv'};"
        " a path given with --set is read from the working directory, one in a config file from its folder)"
    )
    assert not out.exists()
    assert cli.main(["data", "check", "nope.jsonl", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"philora: error: FILE nope.jsonl: no such file or folder (tried {tmp_path / 'nope.jsonl'}; a relative path "
        "is read from the working directory)"
    )


def test_the_sample_data_needs_no_path() -> None:
    config = load_config(None, [f"data.train={SAMPLE / 'train.jsonl'}", "data.eval=sample:eval"])
    from philora.config.relative import missing_data

    assert missing_data(config) == []


def test_a_check_with_warnings_is_not_all_clear() -> None:
    from philora.preflight.report import Report

    assert Report().text().endswith("check: all clear, 0 warning(s)")
    assert Report(warnings=["w"]).text().endswith("check: nothing to fix, 1 warning(s) (below)")
    assert Report(errors=["e"], warnings=["w"]).text().endswith("check: 1 problem(s) to fix, 1 warning(s) (below)")


# --- the answers' length follows the references --------------------------------------------------------------


def test_the_answer_budget_is_the_longest_last_answer_plus_a_margin() -> None:
    from philora.data.render import IGNORE

    def sample(labels: list[int]) -> Sample:
        return Sample(np.arange(len(labels), dtype=np.int32), np.array(labels, dtype=np.int32))

    two_turns = sample([IGNORE, 5, 6, 7, IGNORE, IGNORE, 8, 9])  # the last answer: 2 tokens, not all 5 trained
    assert lengths.last_answer(two_turns) == 2 and lengths.last_answer(sample([IGNORE, IGNORE])) == 0
    long = sample([IGNORE] * 3 + [1] * 30)
    assert lengths.answer_budget([two_turns, long]) == (48, 30)  # 30 + 16, rounded up to 16
    assert lengths.answer_budget([sample([IGNORE] + [1] * 5000)])[0] == lengths.ANSWER_CAP


def test_generation_length_auto_is_resolved_from_the_eval_data(tiny_phi3: Path, tiny_data: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    train, held_out = tiny_data
    given = [f"model.name_or_path={tiny_phi3}", f"data.train={train}", f"data.eval={held_out}"]
    config = load_config(None, [*given, "training_config.generation_max_length=null"])
    prepared = data.prepare(config.data, AutoTokenizer.from_pretrained(tiny_phi3), 0)
    line = data.resolve_generation_length(config, prepared)
    longest = max(lengths.last_answer(s) for s in prepared.eval.samples)
    assert config.training_config.generation_max_length == 16 * -(-(longest + 16) // 16)
    assert line is not None and f"the longest reference answer is {longest} tokens" in line
    assert config.origin("training_config.generation_max_length").startswith("auto:")
    assert data.resolve_generation_length(config, prepared) is None  # resolved once; a value given is kept
