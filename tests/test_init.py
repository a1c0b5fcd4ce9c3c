"""`philora init DATA`: a starter config for the user's own data, derived from the data, the model and the machine,
that `philora check` and `train` read as it is."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import yaml

from philora import cli
from philora.config import load_config
from philora.data.guess import guess_columns
from philora.preflight.starter import learning_rate

ROOT = Path(__file__).resolve().parent.parent


def make_dates(out: Path, train: int, eval: int) -> tuple[Path, Path]:
    spec = importlib.util.spec_from_file_location("make_dates_data", ROOT / "scripts" / "make_dates_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make(out, train, eval)


@pytest.mark.parametrize(
    ("columns", "mapping"),
    [
        (["question", "answer"], {"prompt": "question", "completion": "answer"}),
        (["id", "Query", "Response"], {"prompt": "Query", "completion": "Response"}),
        (["input", "output", "notes"], {"prompt": "input", "completion": "output"}),
        (["prompt", "answer"], {"completion": "answer"}),  # philora's own name needs no mapping
        (["question", "notes"], None),  # no answer column: nothing guessed
        (["text"], None),
    ],
)
def test_columns_are_guessed_from_common_names(columns: list[str], mapping: dict[str, str] | None) -> None:
    assert guess_columns(columns) == mapping


def test_the_learning_rate_follows_the_model_size() -> None:
    assert learning_rate(3_800_000_000) == pytest.approx(2e-4)  # the usual LoRA rate at Phi-3-mini's size
    assert learning_rate(135_000_000) == pytest.approx(1.06e-3, rel=0.01)
    assert learning_rate(14_000_000_000) >= 1e-4 and learning_rate(1_000) == 2e-3  # bounded both ways
    assert learning_rate(135_000_000, "dpo") == pytest.approx(1.06e-3 / 40, rel=0.01)  # demo-dpo's 5e-5 vs 2e-3


def test_init_writes_a_config_for_a_csv_of_questions_and_answers(
    tiny_phi3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    train, held_out = make_dates(data, 60, 10)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["init", "data/dates.csv", "--eval", "data/dates-eval.csv", "--base", str(tiny_phi3)]) == 0
    out = capsys.readouterr().out
    written = tmp_path / "dates.yaml"
    assert f"wrote {written.name}" in out and "philora check --config dates.yaml" in out
    assert "philora train --config dates.yaml" in out
    raw = yaml.safe_load(written.read_text())
    assert raw["data"]["train"] == os.path.join("data", "dates.csv")  # relative to the config's folder
    assert raw["data"]["format"] == "prompt_completion"
    assert raw["data"]["columns"] == {"prompt": "question", "completion": "answer"}
    # every sample fits: the dates are short, and max_length is their p99 rounded up to 64
    assert raw["data"]["max_length"] == 64
    tc = raw["training_config"]
    assert tc["predict_with_generate"] is True and tc["num_train_epochs"] == 3
    assert tc["per_device_train_batch_size"] == 2  # 60 rows: 20 steps per epoch need a micro-batch of at most 3
    assert 8 < tc["generation_max_length"] <= 32  # the longest answer is a dozen tokens
    # the file loads as written, from any folder: its paths are read from beside it
    monkeypatch.chdir(data)
    config = load_config(str(written))
    assert config.data.train == str(train) and config.data.eval == str(held_out)
    assert "# " in written.read_text().splitlines()[0]  # the header says what was read


def test_init_on_preference_pairs_writes_a_dpo_config_with_a_gentler_rate(
    tiny_phi3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text((ROOT / "philora" / "sample" / "preference-train.jsonl").read_text())
    monkeypatch.chdir(tmp_path)
    assert cli.main(["init", "pairs.jsonl", "--base", str(tiny_phi3)]) == 0
    capsys.readouterr()
    raw = yaml.safe_load((tmp_path / "pairs.yaml").read_text())
    tc = raw["training_config"]
    assert raw["data"]["format"] == "preference" and tc["method"] == "dpo"
    config = load_config(str(tmp_path / "pairs.yaml"))
    assert config.model.name_or_path == str(tiny_phi3)
    sft = float(f"{learning_rate(_parameters(tiny_phi3)):.1g}")
    assert tc["learning_rate"] < sft / 10  # preference tuning moves the model's own answers little


def _parameters(model: Path) -> int:
    from philora.config import ModelSection
    from philora.config.fields import Config
    from philora.preflight import architecture

    return architecture.build(Config(ModelSection(name_or_path=str(model)))).parameters


def test_init_refuses_to_replace_a_file_and_names_missing_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("model: {}\n")
    make_dates(tmp_path, 10, 2)
    assert cli.main(["init", "dates.csv", "--output", "mine.yaml"]) == 2
    assert "--output mine.yaml: the file exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "mine.yaml").read_text() == "model: {}\n"  # untouched
    assert cli.main(["init", "nowhere.csv"]) == 2
    assert "DATA nowhere.csv: no such file or folder" in capsys.readouterr().err
    assert cli.main(["init", "dates.csv", "--eval", "gone.csv"]) == 2
    assert "--eval gone.csv: no such file or folder" in capsys.readouterr().err
