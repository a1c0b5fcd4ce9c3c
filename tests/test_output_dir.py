"""The dirs a command writes into: one that is not philora's is refused, never emptied; a run's dir is replaced from
its manifest, a person's files in it kept; the adapter appears whole or not at all; eval and export write over
nothing of anyone else's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config

from philora import cli
from philora.errors import UserError
from philora.rundir import RunDir
from philora.train.output import prepare_output_dir, save_adapter

FOREIGN = {
    "eval/notes.txt": "my notes",
    "runs/exp1.csv": "lr,loss\n",
    "checkpoints/model.bin": "someone's weights",
    "report.html": "<p>my report</p>",
}


def put(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def contents(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_folder_that_is_not_a_run_is_refused_and_nothing_in_it_removed(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "project"
    put(project, FOREIGN)
    config = tiny_config(tmp_path, tiny_phi3, tiny_data)
    overwrite = ["--set", "training_config.overwrite_output_dir=true"]
    assert cli.main(["train", "--config", str(config), "--output", str(project), *overwrite]) == 2
    err = capsys.readouterr().err
    assert f"--output {project}: is not empty (checkpoints, eval, report.html, runs) and not a philora run" in err
    assert "choose another --output, a new or empty directory" in err and "Traceback" not in err
    assert contents(project) == FOREIGN


def test_a_run_is_replaced_by_what_its_manifest_lists_and_a_persons_files_stay(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    config = tiny_config(tmp_path, tiny_phi3, tiny_data, max_steps=2, save_steps=1, eval_steps=2,
                         report_to="tensorboard")  # fmt: skip
    assert cli.main(["train", "--config", str(config), "--output", str(out)]) == 0
    files = RunDir(out)
    manifest = json.loads(files.manifest.read_text())
    assert manifest["written_by"] == "philora" and "adapter/adapter_model.safetensors" in manifest["files"]
    # everything the run wrote is in its manifest: TensorBoard's events, checkpoints, the adapter, the evaluation
    written = files.written()
    unlisted = [p for p in out.rglob("*") if p.is_file() and p != files.manifest
                and not any(w == p or w in p.parents for w in written)]  # fmt: skip
    assert unlisted == [] and (out / "runs").is_dir() and (out / "eval.json").is_file()

    # `philora eval --output` refuses a dir whose report.html is not philora's, before it loads anything
    foreign = tmp_path / "foreign"
    put(foreign, {"report.html": "<p>my report</p>"})
    assert cli.main(["eval", "--adapter", str(out), "--output", str(foreign)]) == 2
    assert f"--output {foreign}: its report.html was not written by philora" in capsys.readouterr().err
    assert contents(foreign) == {"report.html": "<p>my report</p>"}

    # a person's files beside philora's, and an evaluation by `philora eval` into eval/
    mine = {"notes.txt": "mine", "eval/notes.txt": "mine", "adapter/notes.txt": "mine", "checkpoints/mine.txt": "mine"}
    put(out, {**mine, "eval/eval.json": "{}"})
    with pytest.raises(UserError, match=r"already holds a run \(.*\); continue it with --resume"):
        prepare_output_dir(out, overwrite=False)
    prepare_output_dir(out, overwrite=True)
    assert contents(out) == {**mine, "manifest.json": files.manifest.read_text()}


def test_a_run_stopped_before_its_first_checkpoint_can_be_started_again(tmp_path: Path) -> None:
    out = tmp_path / "run"
    prepare_output_dir(out, overwrite=False)  # what a new run does first: the manifest, before anything else
    put(out, {"metrics.jsonl": '{"step": 1, "loss": 2.5}\n', "base-answers.json": "[]\n"})
    with pytest.raises(UserError) as e:
        prepare_output_dir(out, overwrite=False)
    (message,) = e.value.problems
    assert message.startswith(f"--output {out}: holds a run that stopped before its first checkpoint")
    assert "nothing is lost by starting it again: set training_config.overwrite_output_dir: true" in message
    assert "another --output" in message and "--resume" not in message
    prepare_output_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


def test_a_run_from_before_the_manifest_is_known_by_its_run_json(tmp_path: Path) -> None:
    out = tmp_path / "old"
    put(out, {"run.json": json.dumps({"config": {"training_config": {}}}), "adapter/adapter_config.json": "{}",
              "checkpoints/step-2/state.json": "{}", "loss.png": "", "notes.txt": "mine"})  # fmt: skip
    prepare_output_dir(out, overwrite=True)
    assert sorted(contents(out)) == ["manifest.json", "notes.txt"]


def test_nothing_outside_the_run_dir_is_removed_whatever_its_manifest_says(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    put(outside, {"eval.json": "mine", "notes.txt": "mine"})
    out = tmp_path / "run"
    prepare_output_dir(out, overwrite=False)
    (out / "eval").symlink_to(outside)  # a link inside the run dir to a folder of one's own
    manifest = json.loads(RunDir(out).manifest.read_text())
    # a copied run dir's manifest may say anything: only names philora itself writes are acted on
    manifest["files"] += ["../outside/notes.txt", str(outside / "notes.txt"), "**/", "./", "*", "notes.txt",
                          "adapter/*", "data/"]  # fmt: skip
    RunDir(out).manifest.write_text(json.dumps(manifest))
    put(out, {"notes.txt": "mine", "data/train.jsonl": "mine", "adapter/mine.txt": "mine"})
    prepare_output_dir(out, overwrite=True)
    assert contents(outside) == {"eval.json": "mine", "notes.txt": "mine"} and (out / "eval").is_symlink()
    assert {k: v for k, v in contents(out).items() if k != "manifest.json"} == {
        "notes.txt": "mine", "data/train.jsonl": "mine", "adapter/mine.txt": "mine"
    }  # fmt: skip


class Model:
    """Stands in for a peft model: save_pretrained writes an adapter's two files."""

    def __init__(self, weights: str) -> None:
        self.weights = weights

    def save_pretrained(self, path: Path, **_: Any) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "adapter_config.json").write_text("{}")
        (path / "adapter_model.safetensors").write_text(self.weights)


class Tokenizer:
    def __init__(self, killed: bool = False) -> None:
        self.killed = killed

    def save_pretrained(self, path: Path) -> None:
        (path / "tokenizer.json").write_text("{}")
        if self.killed:
            raise KeyboardInterrupt


def test_the_adapter_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "run"
    prepare_output_dir(out, overwrite=False)
    files = RunDir(out)
    with pytest.raises(KeyboardInterrupt):  # killed while the tokenizer is written: no adapter/, not a part of one
        save_adapter(files, Model("first"), Tokenizer(killed=True), None, None)
    assert not files.adapter.exists()
    save_adapter(files, Model("first"), Tokenizer(), None, None)
    assert sorted(p.name for p in files.adapter.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]  # fmt: skip
    assert "adapter/tokenizer.json" in files.recorded()  # type: ignore[operator]

    # written again (a resumed run finishing): the new one replaces the old whole, a person's file carried over
    (files.adapter / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        save_adapter(files, Model("second"), Tokenizer(killed=True), None, None)
    assert (files.adapter / "adapter_model.safetensors").read_text() == "first"
    save_adapter(files, Model("second"), Tokenizer(), None, None)
    assert (files.adapter / "adapter_model.safetensors").read_text() == "second"
    assert (files.adapter / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "manifest.json"]  # no temporary dir left
    prepare_output_dir(out, overwrite=True)
    assert contents(out) == {"adapter/notes.txt": "mine", "manifest.json": files.manifest.read_text()}


def test_eval_replaces_its_own_files_and_refuses_anyone_elses(tmp_path: Path) -> None:
    from philora.eval.report import check_output

    ours = {"eval.json": '{"settings": {}, "samples": []}', "eval.md": "# philora eval\n", "report.html":
            "<html><title>philora eval: run</title></html>"}  # fmt: skip
    put(tmp_path, ours)
    check_output(tmp_path)
    (tmp_path / "eval.md").write_text("# my notes\n")
    with pytest.raises(UserError, match=rf"--output {tmp_path}: its eval.md was not written by philora"):
        check_output(tmp_path)


def test_export_writes_over_nothing_beside_its_file(
    tmp_path: Path, tiny_phi3: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from philora.export import command

    (tmp_path / "model.export.json").write_text("mine")
    assert cli.main(["export", "gguf", "--merged", str(tiny_phi3), "--output", str(tmp_path / "model.gguf")]) == 2
    assert "model.export.json beside it exists and would be overwritten" in capsys.readouterr().err
    (tmp_path / "model.export.json").unlink()

    # a failed gguf export removes its own partial file, not a Modelfile that happens to sit beside it
    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("stopped")

    monkeypatch.setattr(command, "export", fail)
    (tmp_path / "Modelfile").write_text("mine")
    with pytest.raises(RuntimeError):
        cli.main(["export", "gguf", "--merged", str(tiny_phi3), "--output", str(tmp_path / "model.gguf")])
    assert (tmp_path / "Modelfile").read_text() == "mine"
