"""Relative paths in a config file are read from beside that file; `--set` values and outputs stay relative to the
working directory; a path that is not there is named with the key and where philora looked."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_yaml

from philora import cli
from philora.config import PACKAGED_CONFIGS, load_config
from philora.errors import UserError

CONFIG = """
model: {name_or_path: base, adapter: ../runs/sft/adapter}
data: {train: data/train.jsonl, eval: held.jsonl}
training_config: {output_dir: out/run, logging_dir: tb}
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """proj/configs/cfg.yaml naming files beside it, run from another folder, elsewhere/."""
    folder = tmp_path / "proj" / "configs"
    for path in ("data/train.jsonl", "held.jsonl", "base/config.json", "../runs/sft/adapter/adapter_config.json"):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text("{}\n")
    elsewhere = tmp_path / "proj" / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return write_yaml(folder / "cfg.yaml", CONFIG)


def test_inputs_are_read_beside_the_config(project: Path) -> None:
    config = load_config("../configs/cfg.yaml")
    folder = project.parent
    assert config.data.train == str(folder / "data/train.jsonl") and config.data.eval == str(folder / "held.jsonl")
    assert config.model.name_or_path == str(folder / "base")
    assert config.model.adapter == str(folder.parent / "runs/sft/adapter")
    # what a run writes goes under the working directory, as with every other tool
    assert (config.training_config.output_dir, config.training_config.logging_dir) == ("out/run", "tb")
    # run.json records the config as resolved, so eval and serve find the data from any folder
    assert config.to_dict()["data"]["train"] == str(folder / "data/train.jsonl")


def test_set_values_stay_relative_to_the_working_directory(project: Path) -> None:
    config = load_config(str(project), ["data.train=mine.jsonl", "model.adapter=runs/a"])
    assert (config.data.train, config.model.adapter) == ("mine.jsonl", "runs/a")
    assert config.data.eval == str(project.parent / "held.jsonl")


def test_what_is_not_a_path_is_left_alone(project: Path) -> None:
    write_yaml(project, "model: {name_or_path: microsoft/Phi-3-mini-4k-instruct}\ndata: {train: owner/chats:train}\n")
    config = load_config(str(project))
    assert (config.model.name_or_path, config.data.train) == ("microsoft/Phi-3-mini-4k-instruct", "owner/chats:train")
    write_yaml(project, "data: {train: sample:tools-train, eval: 0.1}\n")
    assert (load_config(str(project)).data.train, load_config(str(project)).data.eval) == ("sample:tools-train", 0.1)


def test_a_missing_path_names_the_key_and_where_it_looked(project: Path, capsys: pytest.CaptureFixture) -> None:
    Path("dates.csv").write_text("q,a\n")  # in the working directory, not beside the config: the config's folder wins
    write_yaml(project, "\nmodel: {adapter: runs/x}\ndata: {train: dates.csv}\n")
    assert cli.main(["config", "--config", str(project)]) == 2
    folder = project.parent
    assert capsys.readouterr().err.splitlines() == [
        f"philora: error: {project}:2: model.adapter: runs/x: no such file or folder (looked in {folder}/, beside "
        "cfg.yaml)",
        f"philora: error: {project}:3: data.train: dates.csv: no such file or folder (looked in {folder}/, beside "
        "cfg.yaml; dates.csv is in the working directory: write the path relative to the config, or absolute)",
    ]


def test_presets_keep_their_paths_relative_to_the_working_directory() -> None:
    """demo-dpo's adapter is the demo's output, out/demo/adapter under the working directory, by name or by path."""
    for name in ("demo-dpo", str(PACKAGED_CONFIGS / "demo-dpo.yaml")):
        assert load_config(name).model.adapter == "out/demo/adapter"


def test_a_model_path_that_cannot_be_a_hub_id_must_exist(project: Path) -> None:
    write_yaml(project, "model: {name_or_path: ./models/phi3}\n")
    with pytest.raises(UserError, match=r"model.name_or_path: ./models/phi3: no such file or folder \(looked in"):
        load_config(str(project))
