"""Checkpoints: tensors and plain data only (a crafted trainer.pt runs nothing), written so that a kill or a full
disk leaves either a whole checkpoint or one that is not counted, and `--resume` falling back past damaged ones."""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import read_jsonl, tiny_config

from philora import cli
from philora.config import Config, TrainingSection, load_config
from philora.errors import UserError
from philora.train import checkpoint
from philora.train.run import check_resume, make_optimizer

SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt"]  # fmt: skip
ADAPTER = "adapter/adapter_model.safetensors"


class Trainee:
    """A LoRA model on a one-layer random Phi-3 with its optimizer and schedule (philora's own), a step taken."""

    def __init__(self, rank: int = 2, hidden: int = 16, schedule: str = "linear") -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import Phi3Config, Phi3ForCausalLM

        torch.manual_seed(0)
        config = Phi3Config(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                            num_attention_heads=2, pad_token_id=0)  # fmt: skip
        lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv_proj", "o_proj"], init_lora_weights=False)
        self.model = get_peft_model(Phi3ForCausalLM(config), lora)
        tc = TrainingSection(lr_scheduler_type=schedule, warmup_steps=2)
        self.optimizer, self.scheduler = make_optimizer(self.model, tc, total_steps=10)
        self.step()

    def step(self) -> None:
        ids = torch.randint(1, 64, (1, 8))
        self.model(input_ids=ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def save(self, out: Path, step: int, keep: int | None = None) -> Path:
        state = {"step": step, "progress": {"step": step}, "config": {}}
        return checkpoint.save(out, self.model, self.optimizer, self.scheduler, state, keep)


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def same(a: Any, b: Any) -> bool:
    """Nested state dicts equal, tensors bit for bit."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("schedule", SCHEDULERS)
def test_a_checkpoint_is_read_without_unpickling_and_restores_exactly(tmp_path: Path, schedule: str) -> None:
    """Every schedule philora offers keeps its state in plain data and tensors (JSON and safetensors)."""
    trainee = Trainee(schedule=schedule)
    saved = trainee.save(tmp_path, 1)
    optimizer, scheduler = copy.deepcopy(trainee.optimizer.state_dict()), trainee.scheduler.state_dict()
    adapter = {n: p.detach().clone() for n, p in trainee.model.named_parameters() if p.requires_grad}
    expected = draws()
    trainee.step()  # moves weights, optimizer, schedule and every RNG on
    checkpoint.restore(checkpoint.read(saved), trainee.model, trainee.optimizer, trainee.scheduler)
    assert draws() == expected
    assert same(trainee.optimizer.state_dict(), optimizer) and same(trainee.scheduler.state_dict(), scheduler)
    assert all(torch.equal(p, adapter[n]) for n, p in trainee.model.named_parameters() if p.requires_grad)


def test_writing_a_step_again_replaces_it_whole(tmp_path: Path) -> None:
    trainee = Trainee()
    trainee.save(tmp_path, 2)
    trainee.step()
    path = trainee.save(tmp_path, 2)  # as a run resumed from an older checkpoint does
    restored = checkpoint.read(path)
    assert same(restored.optimizer, trainee.optimizer.state_dict())
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]


def test_a_kill_while_pruning_leaves_a_checkpoint_that_is_not_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainee = Trainee()
    trainee.save(tmp_path, 1)
    real_rmtree = shutil.rmtree

    def killed_midway(path: Path, **kwargs: Any) -> None:
        if not Path(path).name.startswith("step-"):
            return real_rmtree(path, **kwargs)
        (Path(path) / "trainer.json").unlink()  # one file of a pruned checkpoint gone, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        trainee.save(tmp_path, 2, keep=1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    root = tmp_path / "checkpoints"
    assert (root / "step-1").is_dir() and checkpoint.checkpoints(tmp_path) == [root / "step-2"]
    (root / ".tmp-step-3").mkdir()  # a save cut off by a kill
    trainee.save(tmp_path, 4, keep=2)  # the next save clears what the kills left
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 1 MiB tmpfs, which a checkpoint of `Trainee(rank=64, hidden=128)` (about 0.6 MiB) fills the second time."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                                   capture_output=True).returncode == 0  # fmt: skip
    if not mounted:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)  # lazy: a failed test may hold a file open


def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(small_disk: Path) -> None:
    trainee = Trainee(rank=64, hidden=128)
    first = trainee.save(small_disk, 1)
    with pytest.raises(UserError) as caught:
        trainee.save(small_disk, 2)
    (problem,) = caught.value.problems
    root = small_disk / "checkpoints"
    assert problem.startswith(f"checkpoint {root / 'step-2'}: the disk is full (")
    assert re.search(rf"\); a checkpoint needs about \d+ KiB and \d+ KiB is free in {root}; free space", problem)
    assert problem.endswith(f"continue from {first} with --resume") and "\n" not in problem
    assert [p.name for p in root.iterdir()] == ["step-1"] and checkpoint.read(first).step == 1


def test_an_enospc_from_any_writer_is_the_same_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no tmpfs can be mounted (no root), the OSError a full disk raises, injected."""

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    trainee = Trainee()
    monkeypatch.setattr(checkpoint.plain, "save", no_space)
    with pytest.raises(UserError, match=r"the disk is full \(\[Errno 28\] No space left on device\); a checkpoint"):
        trainee.save(tmp_path, 1)
    assert list((tmp_path / "checkpoints").iterdir()) == []


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_phi3: Path, tiny_data: tuple[Path, Path]) -> Path:
    """A whole 4-step run of the tiny Phi-3 with checkpoints after steps 1, 2 and 3."""
    base = tmp_path_factory.mktemp("finished")
    path = tiny_config(base, tiny_phi3, tiny_data, predict_with_generate=False, max_steps=4, save_steps=1,
                       eval_strategy="no", do_eval=False, logging_steps=1)  # fmt: skip
    assert cli.main(["train", "--config", str(path), "--output", str(base / "run")]) == 0
    return base


def copy_of(finished: Path, tmp_path: Path) -> tuple[Path, Path, Config]:
    out = tmp_path / "run"
    shutil.copytree(finished / "run", out)
    config = load_config(str(finished / "tiny.yaml"), [f"training_config.output_dir={out}"])
    return out, finished / "tiny.yaml", config


class Payload:
    """What a crafted trainer.pt holds: unpickling it opens (creates) a file, the harmless stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


def craft(step: Path, marker: Path) -> None:
    """A pickled trainer.pt (an older philora's layout) whose loading would run code in place of the plain state,
    with the marker of a complete checkpoint to match."""
    torch.save({"optimizer": Payload(marker), "scheduler": {}, "rng": {}}, step / "trainer.pt")
    listed = json.loads((step / "complete.json").read_text())
    for name in ("trainer.json", "trainer.safetensors"):
        (step / name).unlink()
        del listed["files"][name]
    listed["files"]["trainer.pt"] = (step / "trainer.pt").stat().st_size
    (step / "complete.json").write_text(json.dumps(listed))


def test_a_crafted_trainer_pt_runs_nothing_and_the_run_resumes_exactly_from_the_one_before(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, config, _ = copy_of(finished, tmp_path)
    marker = tmp_path / "code-ran"
    craft(out / "checkpoints/step-3", marker)
    assert cli.main(["train", "--config", str(config), "--output", str(out), "--resume"]) == 0
    assert not marker.exists()
    err = capsys.readouterr().err
    assert f"philora: warning: skipping {out / 'checkpoints/step-3'}: trainer.pt is pickled state" in err
    assert f"resuming from {out / 'checkpoints/step-2'} at step 2/4" in err
    assert (out / ADAPTER).read_bytes() == (finished / "run" / ADAPTER).read_bytes()
    assert read_jsonl(out / "metrics.jsonl") and [r["loss"] for r in read_jsonl(out / "metrics.jsonl")] == [
        r["loss"] for r in read_jsonl(finished / "run/metrics.jsonl")
    ]


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


DAMAGE = {
    "trainer.json is truncated (": lambda step: truncate(step / "trainer.json"),
    "trainer.safetensors is truncated (": lambda step: truncate(step / "trainer.safetensors"),
    "state.json is missing": lambda step: (step / "state.json").unlink(),
    "complete.json is missing": lambda step: (step / "complete.json").unlink(),
    f"{ADAPTER} is truncated (": lambda step: truncate(step / ADAPTER),
}


@pytest.mark.parametrize("reason", DAMAGE)
def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_says_why(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], reason: str
) -> None:
    out, _, config = copy_of(finished, tmp_path)
    DAMAGE[reason](out / "checkpoints/step-3")
    found = check_resume(out, True, config)
    assert found is not None and found.path == out / "checkpoints/step-2" and found.step == 2
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(
        f"philora: warning: skipping {out / 'checkpoints/step-3'}: {reason}"
    )
    with pytest.raises(UserError, match=f"--resume {out / 'checkpoints/step-3'}: {reason}".replace("(", r"\(")):
        check_resume(out, str(out / "checkpoints/step-3"), config)  # named: no fallback, the reason


def test_resume_with_no_checkpoint_gives_no_circular_advice(finished: Path, tmp_path: Path) -> None:
    out, _, config = copy_of(finished, tmp_path)
    shutil.rmtree(out / "checkpoints")  # a run killed before its first checkpoint
    with pytest.raises(UserError) as caught:
        check_resume(out, True, config)
    (problem,) = caught.value.problems
    assert problem.startswith(f"--resume: the run in {out} stopped before its first checkpoint")
    assert "again without --resume" in problem and "nothing will be lost" in problem
    assert "with --resume" not in problem.replace("without --resume", "")


def test_trainer_state_that_names_anything_but_plain_data_and_tensors_is_damaged(tmp_path: Path) -> None:
    """trainer.json is read as data: an object this format never writes (here what a pickle-minded crafter would
    try, a class to call) is refused, not interpreted."""
    path = Trainee().save(tmp_path, 1)
    crafted = {"items": [["optimizer", {"callable": "os.system", "args": ["true"]}]]}
    (path / "trainer.json").write_text(json.dumps(crafted))
    listed = json.loads((path / "complete.json").read_text())
    listed["files"]["trainer.json"] = (path / "trainer.json").stat().st_size
    (path / "complete.json").write_text(json.dumps(listed))
    with pytest.raises(checkpoint.Damaged, match=r"trainer.json or trainer.safetensors does not load \(an object"):
        checkpoint.read(path)


def test_adapters_and_checkpoints_are_written_with_the_users_umask(tmp_path: Path, embedded_tokenizer: Path) -> None:
    """Every file gets the mode a plain open() gives (0o666 less the umask), the tensors too, so another user (a
    vLLM server, a teammate) can read what the run shares: safetensors alone would leave its files 0600."""
    from transformers import AutoTokenizer

    from philora.rundir import RunDir
    from philora.train.output import save_adapter

    trainee = Trainee()
    out = tmp_path / "run"
    out.mkdir()
    step = trainee.save(out, 1)
    save_adapter(RunDir(out), trainee.model, AutoTokenizer.from_pretrained(embedded_tokenizer), None, None)
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert {ADAPTER, "trainer.safetensors"} <= {p.relative_to(step).as_posix() for p in step.rglob("*")}
    assert "adapter/adapter_model.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~mask)
