"""The training loop end to end on a tiny Phi-3: files written, LoRA moved, base untouched, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import pair_data, read_jsonl, tiny_config
from safetensors.torch import load_file

from philora import cli
from philora.config import load_config
from philora.train import checkpoint
from philora.train.run import train


def test_tiny_train_writes_a_complete_run(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path]) -> None:
    out = tmp_path / "out"
    assert cli.main(["train", "--config", str(tiny_config(tmp_path, tiny_phi3, tiny_data)), "--output", str(out)]) == 0
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "run.json",
        "loss.png",
        "eval.json",
        "checkpoints/step-3/state.json",
        "checkpoints/step-3/trainer.json",
        "checkpoints/step-3/trainer.safetensors",
        "checkpoints/step-3/complete.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in records if "loss" in r)
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 6 and run["seed"] == 7 and len(run["data"]["fingerprint"]) == 64
    assert run["data"]["train"]["conversations"] == 24 and run["data"]["eval"]["conversations"] == 6
    assert run["data"]["sources"][0]["rows"] == 24 and run["data"]["rejected_rows"] == 0
    assert run["config"]["peft_config"]["r"] == 4 and run["versions"]["peft"]
    assert run["wall_seconds"] > 0 and run["generation_eval"]["prompts"] == 6
    adapter = json.loads((out / "adapter/adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_lora_moves_base_stays_and_plain_peft_reproduces_the_model(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = load_config(
        str(tiny_config(tmp_path, tiny_phi3, tiny_data, predict_with_generate=False)),
        [f"training_config.output_dir={tmp_path / 'out'}"],
    )
    result = train(config)
    original = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    trained = result.model
    base_after = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p
        for n, p in trained.named_parameters()
        if "lora_" not in n
    }
    for name, param in original.named_parameters():
        assert torch.equal(param, base_after[name]), f"base weight {name} changed"
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "LoRA B (zero at init) did not move"

    reloaded = PeftModel.from_pretrained(original, result.output_dir / "adapter").eval()
    ids = torch.randint(3, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained.eval()(ids).logits, rtol=0, atol=1e-6)
        with reloaded.disable_adapter():
            assert not torch.allclose(reloaded(ids).logits, trained(ids).logits, atol=1e-4)


def test_resume_continues_exactly(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_config(tmp_path, tiny_phi3, tiny_data, predict_with_generate=False, save_steps=2)
    whole = train(load_config(str(path), [f"training_config.output_dir={tmp_path / 'whole'}"])).output_dir

    real_save = checkpoint.save

    def save_then_die(*args: object, **kwargs: object) -> Path:
        saved = real_save(*args, **kwargs)
        if saved.name == "step-4":
            raise KeyboardInterrupt
        return saved

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    cut = tmp_path / "cut"
    assert cli.main(["train", "--config", str(path), "--output", str(cut)]) == 130
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert not (cut / "adapter").exists()
    assert cli.main(["train", "--config", str(path), "--output", str(cut)]) == 2  # refuses to start over it
    assert cli.main(["train", "--config", str(path), "--output", str(cut), "--resume"]) == 0

    a, b = (load_file(d / "adapter/adapter_model.safetensors") for d in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r.get("loss"), r.get("eval_loss")] for r in read_jsonl(whole / "metrics.jsonl")]
    assert losses == [[r.get("loss"), r.get("eval_loss")] for r in read_jsonl(cut / "metrics.jsonl")]


def test_a_run_resumes_with_evaluation_turned_on(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What is evaluated is not what trains: a checkpoint of a run without evaluation (an earlier philora's default)
    resumes with today's, and the starting model's answers are taken at the end."""
    path = tiny_config(tmp_path, tiny_phi3, tiny_data, predict_with_generate=False, do_eval=False, max_steps=4,
                       save_steps=2, eval_strategy="no")  # fmt: skip
    real_save = checkpoint.save

    def save_then_die(*args: object, **kwargs: object) -> Path:
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    out = tmp_path / "out"
    assert cli.main(["train", "--config", str(path), "--output", str(out)]) == 130
    monkeypatch.setattr(checkpoint, "save", real_save)
    evaluate = ["--set", "training_config.predict_with_generate=true", "--set", "training_config.do_eval=null"]
    assert cli.main(["train", "--config", str(path), "--output", str(out), "--resume", *evaluate]) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["before"] is not None and evaluation["after"] is not None


def test_resume_refuses_a_different_config(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path]) -> None:
    path = tiny_config(tmp_path, tiny_phi3, tiny_data, predict_with_generate=False, max_steps=3, save_steps=2)
    out = tmp_path / "out"
    assert cli.main(["train", "--config", str(path), "--output", str(out)]) == 0
    with pytest.raises(Exception, match=r"training_config\.learning_rate: 0\.01 in the checkpoint, 0\.02 now"):
        train(
            load_config(str(path), [f"training_config.output_dir={out}", "training_config.learning_rate=0.02"]),
            resume=True,
        )


def test_wrong_target_names_exit_2(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tiny_config(tmp_path, tiny_phi3, tiny_data)
    code = cli.main(
        [
            "train",
            "--config",
            str(path),
            "--output",
            str(tmp_path / "o"),
            "--set",
            "peft_config.target_modules=[q_proj,v_proj]",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "q_proj, v_proj match no module of Phi3ForCausalLM" in err and "Traceback" not in err


def test_plan_visits_every_row_once_per_epoch_in_seeded_order() -> None:
    from philora.train.loop import due
    from philora.train.plan import Plan

    plan = Plan(rows=[[i] for i in range(10)], batch_size=3, accumulation=2, total_steps=4, seed=5)
    assert plan.per_epoch == 4  # micro-batches of 3, 3, 3, 1
    first_epoch = [row[0] for step in (0, 1) for batch in plan.micro_batches(step) for row in batch]
    second_epoch = [row[0] for step in (2, 3) for batch in plan.micro_batches(step) for row in batch]
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(10))
    assert first_epoch != second_epoch  # reshuffled each epoch
    assert plan.micro_batches(1) == Plan([[i] for i in range(10)], 3, 2, 4, seed=5).micro_batches(1)
    assert [plan.ends_epoch(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    assert [due("epoch", 1, s, plan) for s in (1, 2)] == [False, True]
    assert [due("steps", 3, s, plan) for s in (2, 3)] == [False, True]
    assert not due("no", 1, 2, plan)


def test_bf16_weights_train_with_fp32_adapters(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path]) -> None:
    """The path `dtype: auto` takes on CPUs with native bf16 (AMX) and on GPUs."""
    path = tiny_config(tmp_path, tiny_phi3, tiny_data, predict_with_generate=False, max_steps=3, eval_strategy="no")
    result = train(load_config(str(path), ["model.dtype=bfloat16", f"training_config.output_dir={tmp_path / 'b'}"]))
    dtypes = {n: p.dtype for n, p in result.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    losses = [r["loss"] for r in read_jsonl(result.output_dir / "metrics.jsonl") if "loss" in r]
    # A random model over a 49152-word vocabulary starts near ln(49152) = 10.8, and LoRA at lr 0.01 lowers it.
    assert len(losses) == 2 and abs(losses[0] - math.log(49152)) < 0.5 and losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "method"), [("float32", "sft"), ("bfloat16", "sft"), ("float32", "dpo")])
def test_resume_after_sigkill_is_exact(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], dtype: str, method: str
) -> None:
    """kill -9 a real run at a seeded random step, leave a half-written checkpoint and a torn log line behind as a
    kill inside a write would, resume: the same adapter bytes and the same losses as a run never interrupted. In
    bf16 (the weights' dtype on GPUs and AMX CPUs) as in fp32: no tolerance, the bytes are equal.

    Each run is its own process, as a user's runs are: a run inside this long-lived pytest process computes in
    whatever state earlier tests left it (run.json records the thread count each run had)."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    data = tiny_data if method == "sft" else pair_data(tmp_path, tiny_data)  # dpo: reference log-probs kept too
    path = tiny_config(tmp_path, tiny_phi3, data, predict_with_generate=False, max_steps=8, save_steps=1, method=method)
    command = [sys.executable, "-m", "philora", "train", "--config", str(path), "--set", f"model.dtype={dtype}"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = subprocess.run([*command, "--output", str(whole)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seed = random.randrange(1 << 30)
    stop_at = random.Random(seed).randint(2, 6)
    print(f"kill -9 after checkpoint step-{stop_at} (seed {seed})")
    run = subprocess.Popen([*command, "--output", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoints" / f"step-{stop_at}").exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, f"the run ended before step {stop_at}"
    newest = checkpoint.checkpoints(cut)[-1]
    step = int(newest.name.removeprefix("step-"))
    assert step < 8
    partial = cut / "checkpoints" / f".tmp-step-{step + 1}"  # what a kill inside the next save leaves
    (partial / "adapter").mkdir(parents=True, exist_ok=True)
    (partial / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with (cut / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "loss": 1.2')  # a line cut in the middle
    done = subprocess.run([*command, "--output", str(cut), "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads((d / "run.json").read_text()) for d in (whole, cut)]
    assert records[0]["model_dtype"] == records[1]["model_dtype"] == dtype
    adapter = "adapter/adapter_model.safetensors"
    assert (whole / adapter).read_bytes() == (cut / adapter).read_bytes(), [r["torch_threads"] for r in records]
    losses = [r.get("loss") for r in read_jsonl(whole / "metrics.jsonl")]
    assert losses == [r.get("loss") for r in read_jsonl(cut / "metrics.jsonl")]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from philora.train import loop as train_module

    path = tiny_config(tmp_path, tiny_phi3, tiny_data, predict_with_generate=False, save_steps=2)
    real_step, calls = train_module.optimizer_step, []

    def diverging(*args: object, **kwargs: object) -> tuple:
        loss, norm, stats = real_step(*args, **kwargs)
        calls.append(loss)
        return (float("nan") if len(calls) == 3 else loss), norm, stats

    monkeypatch.setattr(train_module, "optimizer_step", diverging)
    out = tmp_path / "out"
    assert cli.main(["train", "--config", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "philora: error: training: the loss became nan at step 3; lower training_config.learning_rate" in err
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-2'}" in err and "Traceback" not in err
    assert [p.name for p in checkpoint.checkpoints(out)] == ["step-2"] and not (out / "adapter").exists()
    saved = load_file(out / "checkpoints/step-2/adapter/adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_metrics_go_to_tensorboard(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = tiny_config(tmp_path, tiny_phi3, tiny_data, predict_with_generate=False, report_to="tensorboard")
    out = train(load_config(str(path), [f"training_config.output_dir={tmp_path / 'out'}"])).output_dir
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    records = read_jsonl(out / "metrics.jsonl")
    logged = [r for r in records if "loss" in r]
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in logged]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in logged])
    assert [e.step for e in events.Scalars("eval/loss")] == [r["step"] for r in records if "eval_loss" in r]


def test_a_reporter_without_its_package_says_what_to_install(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here; its missing-package message cannot be shown")
    path = tiny_config(tmp_path, tiny_phi3, tiny_data, report_to=["tensorboard", "wandb"])
    assert cli.main(["train", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "training_config.report_to: wandb needs its package; pip install wandb" in capsys.readouterr().err


def test_reporters_start_after_the_checks_with_the_values_auto_chose(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from philora.train import run as stages

    started: list[dict] = []
    monkeypatch.setattr(stages, "reporters", lambda kinds, log_dir, name, config: started.append(config) or [])
    path = tiny_config(tmp_path, tiny_phi3, tiny_data, max_steps=1, eval_strategy="no", generation_max_length=None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert (
        cli.main(["train", "--config", str(path), "--output", str(tmp_path / "a"), "--set", f"data.train={bad}"]) == 2
    )
    assert started == []  # a run the checks stop starts no dashboard run
    auto = ["--set", "data.max_length=null"]
    assert cli.main(["train", "--config", str(path), "--output", str(tmp_path / "b"), *auto]) == 0
    (config,) = started
    recorded = json.loads((tmp_path / "b" / "run.json").read_text())["config"]
    assert isinstance(config["data"]["max_length"], int) and config["data"] == recorded["data"]
    assert isinstance(config["training_config"]["generation_max_length"], int)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpointing_a_fraction_of_layers_keeps_the_losses(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """Also in bf16 with the matmul attention, whatever this CPU would choose: its recomputation keeps the
    probabilities a second time, the fused LoRA and RMSNorm functions run again."""
    from transformers import AutoModelForCausalLM

    from philora.model import packed_attention

    monkeypatch.setattr(packed_attention, "matmul_attention", lambda d, device_type: d == torch.bfloat16)
    calls: list[int] = []
    real = packed_attention.CausalAttention.apply
    monkeypatch.setattr(packed_attention.CausalAttention, "apply", lambda *a: calls.append(1) or real(*a))
    from transformers.modeling_layers import GradientCheckpointingLayer

    from philora.config import TrainingSection
    from philora.train.run import checkpoint_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_phi3)
    checkpoint_layers(model, TrainingSection(gradient_checkpointing=True, gradient_checkpointing_layers=0.5))
    flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert flags == [True, False]

    path = tiny_config(tmp_path, tiny_phi3, tiny_data, predict_with_generate=False, eval_strategy="no", max_steps=3)
    losses = []
    for name, extra in (("plain", []), ("half", ["training_config.gradient_checkpointing=true",
                                                 "training_config.gradient_checkpointing_layers=0.5"])):  # fmt: skip
        out = tmp_path / name
        settings = [f"training_config.output_dir={out}", "training_config.logging_steps=1", f"model.dtype={dtype}"]
        train(load_config(str(path), [*settings, *extra]))
        losses.append([r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r])
    # Recomputation replays the same dropout masks (the RNG state is restored), so nothing changes but memory.
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and len(losses[0]) == 3
    assert bool(calls) is (dtype == "bfloat16")
