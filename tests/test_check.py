"""`philora check`: the model on the meta device counts what training makes, the memory estimate holds against
measured peaks, problems exit 2 with their fix, and `philora train` runs the same checks first."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from philora.cli import main
from philora.config import load_config
from philora.lora.targets import apply_lora, trainable_parameters
from philora.model import fast_path
from philora.model.load import load_model
from philora.model.packed_attention import varlen_arguments
from philora.preflight import architecture, memory
from tests.conftest import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from gpu import PHI3_MINI, build_tokenizer
from memory_estimate import estimated, measured, overrides


def run_check(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict]:
    status = main(["check", *args, "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_meta_model_counts_what_training_makes(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path]) -> None:
    config = load_config(str(tiny_config(tmp_path, tiny_phi3, tiny_data)),
                         ['peft_config.target_modules=["qkv_proj:q,v", o_proj]'])  # fmt: skip
    arch = architecture.build(config)
    assert next(arch.model.parameters()).device.type == "meta"
    real = apply_lora(load_model(config.model, training=True), config.peft_config, say=False)
    assert (arch.trainable, arch.total) == trainable_parameters(real)
    assert arch.parameters == sum(p.numel() for p in real.get_base_model().parameters() if not p.requires_grad)
    assert arch.adapted == {"o_proj": 2, "qkv_proj": 2}
    assert arch.fused == {"qkv_proj": "q,v adapted", "gate_up_proj": "not adapted"}
    assert arch.tied_embeddings and arch.context == 1024 and arch.rope == "default"


def test_meta_pass_saves_what_a_real_forward_saves(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path]
                                                   ) -> None:  # fmt: skip
    """The counting pass on the meta device against the same count on a real CPU forward of the same model."""
    config = load_config(str(tiny_config(tmp_path, tiny_phi3, tiny_data)), [])
    batch, length = 2, 256
    counted = memory.saved_for_backward(architecture.build(config), batch, length, packed=False)
    model = apply_lora(load_model(config.model, training=True), config.peft_config, say=False)
    fast_path.install(model)  # as train.run.build does
    model.train()
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if (key := t.untyped_storage()._cdata) not in weights:
            sizes[key] = max(sizes.get(key, 0), t.untyped_storage().nbytes())
        return t

    # as training feeds it: the batch's samples in one flat row, attention told where each starts
    ids = torch.randint(0, 1000, (1, batch * length))
    positions = torch.arange(length).repeat(batch)[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_base_model().get_decoder()(input_ids=ids, position_ids=positions, **varlen_arguments(positions))
    real = sum(sizes.values())
    assert real > 0 and abs(counted.total - real) / real < 0.05, (counted.total, real)
    assert len(counted.per_layer) == 2 and counted.layer_input == batch * length * 32 * 4


def test_report_has_every_section_and_exit_0(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path],
                                             capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    config = str(tiny_config(tmp_path, tiny_phi3, tiny_data))
    assert main(["check", "--config", config]) == 0
    out = capsys.readouterr().out
    for section in ("config", "data", "model", "tokens", "memory"):
        assert any(line.startswith(section) for line in out.splitlines()), section
    assert "fused: qkv_proj q,k,v adapted; gate_up_proj gate,up adapted" in out
    assert "end-of-turn '<|im_end|>' (2)" in out and out.rstrip().endswith("check: all clear, 0 warning(s)")
    status, report = run_check(capsys, "--config", config)
    assert status == 0 and report["ok"] and report["errors"] == []
    assert report["model"]["name"] == "Phi3ForCausalLM" and report["model"]["trainable"] > 0
    parts = report["memory"]["parts"]
    assert report["memory"]["total"] == sum(parts.values()) and parts["activations"] > 0
    assert report["tokens"]["end_of_turn_trained"].split()[0] != "0"


def test_problems_exit_2_each_with_its_fix(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path],
                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    config = str(tiny_config(tmp_path, tiny_phi3, tiny_data))
    assert main(["check", "--config", config, "--set", "peft_config.target_modules=[q_proj, v_proj]"]) == 2
    err = capsys.readouterr().err
    assert "peft_config.target_modules: q_proj, v_proj match no module" in err and "qkv_proj:q,v" in err
    status, report = run_check(capsys, "--config", config, "--set", "data.max_length=2048")
    assert status == 2 and not report["ok"]
    assert report["errors"] == ["data.max_length: 2048 is beyond the model's context of 1024 tokens; use at most 1024"]


def test_a_step_that_does_not_fit_is_refused_with_settings_that_would(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    config = str(tiny_config(tmp_path, tiny_phi3, tiny_data, per_device_train_batch_size=8))
    status, report = run_check(capsys, "--config", config)
    need = report["memory"]["total"]
    small = need - report["memory"]["parts"]["activations"] // 2  # room for the step at a smaller micro-batch
    monkeypatch.setattr(memory, "device_memory", lambda: ("cpu", small, small, report["memory"]["parts"]["runtime"]))
    status, report = run_check(capsys, "--config", config)
    assert status == 2 and len(report["errors"]) == 1
    error = report["errors"][0]
    assert error.startswith("memory: one step needs about") and "more than this device's" in error
    assert "training_config.per_device_train_batch_size: 4 with gradient_accumulation_steps: 2" in error
    assert "training_config.gradient_checkpointing: true" in error and "model.quantization: 4bit" in error
    short = ["(not enough alone)" in fix for fix in error.split("; ")[1:]]  # those that fit first, the rest marked
    assert short == sorted(short) and not short[0]


def test_settings_that_fit_only_together_are_offered_together(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Phi-3-mini's LoRA preset in fp32 on a 24 GB CPU: 47 GiB; micro-batch 1 alone 23.5, not quite; with 4-bit 11.7
    from types import SimpleNamespace

    from philora.preflight.command import alternatives

    path = tiny_config(tmp_path, tiny_phi3, tiny_data, per_device_train_batch_size=4, gradient_checkpointing=True)
    config = load_config(str(path), [])
    full = config.data.max_length

    def bytes_(c: object) -> SimpleNamespace:  # 100 a row, halved by 4 bits and by half the length
        rows = c.training_config.per_device_train_batch_size  # type: ignore[attr-defined]
        scale = (0.5 if c.model.quantization else 1) * c.data.max_length / full  # type: ignore[attr-defined]
        return SimpleNamespace(total=int(100 * rows * scale))

    monkeypatch.setattr(memory, "estimate", lambda c, arch: bytes_(c))
    found = dict(alternatives(config, None, SimpleNamespace(total=400, available=60, capacity=60)))  # type: ignore[arg-type]
    smallest = "training_config.per_device_train_batch_size: 1 with gradient_accumulation_steps: 4"
    assert found[smallest] == 100 and found["model.quantization: 4bit"] == 200
    assert found[f"{smallest}, and model.quantization: 4bit"] == 50
    assert found[f"{smallest}, and data.max_length: {full // 2} (longer samples handled per data.overlong)"] == 50
    assert not any("gradient_checkpointing" in how for how in found)  # on already


def test_4bit_on_a_cpu_is_warned_only_where_the_plain_weights_fit(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # each use of a 4-bit weight on a CPU unpacks it: at 3.8B in fp32, 114 s a step against 67 s unquantized
    config = str(tiny_config(tmp_path, tiny_phi3, tiny_data))
    status, report = run_check(capsys, "--config", config, "--set", "model.quantization=4bit")
    slower = [w for w in report["warnings"] if w.startswith("model.quantization: 4bit on a CPU unpacks")]
    assert status == 0 and len(slower) == 1 and "set model.quantization: null" in slower[0]
    quantized = report["memory"]["total"] - report["memory"]["parts"]["runtime"]  # what this process holds varies
    status, report = run_check(capsys, "--config", config)
    assert not any("unpacks" in w for w in report["warnings"])
    runtime = report["memory"]["parts"]["runtime"]
    between = runtime + (quantized + report["memory"]["total"] - runtime) // 2  # room for the 4-bit run only
    monkeypatch.setattr(memory, "device_memory", lambda: ("cpu", between, between, runtime))
    status, report = run_check(capsys, "--config", config, "--set", "model.quantization=4bit")
    assert status == 0 and not any("unpacks" in w for w in report["warnings"])


def test_time_runs_real_steps_and_estimates_the_run(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path],
                                                    capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    config = str(tiny_config(tmp_path, tiny_phi3, tiny_data, max_steps=40))
    status, report = run_check(capsys, "--config", config, "--time")
    assert status == 0
    timed = report["time"]
    assert timed["steps"] == 40 and timed["seconds_per_step"] > 0
    assert timed["eta_s"] == pytest.approx(40 * timed["seconds_per_step"])
    assert timed["tokens_per_s"] > 0 and timed["measured_peak_memory"] > 0


def test_train_stops_on_what_check_refuses(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path],
                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    config = str(tiny_config(tmp_path, tiny_phi3, tiny_data))
    out = tmp_path / "run"
    assert main(["train", "--config", config, "--output", str(out), "--set", "data.max_length=2048"]) == 2
    err = capsys.readouterr().err
    assert "data.max_length: 2048 is beyond the model's context of 1024 tokens" in err
    assert "Loading weights" not in err and not (out / "adapter").exists()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "checkpointed"])
def test_estimate_within_20_percent_of_a_real_step_on_the_embedded_model(
    embedded_dir: Path, tmp_path: Path, checkpointing: bool
) -> None:
    # the heap slack is measured in fp32 (see philora/preflight/memory.py)
    settings = [*overrides(f"1024,2,{str(checkpointing).lower()}"), "model.dtype=float32"]
    estimate, peak = estimated("demo", settings)["total"], measured("demo", settings, tmp_path / "run")
    assert abs(estimate - peak) / peak < 0.2, (estimate, peak)


def test_estimate_within_20_percent_of_a_real_step_on_a_tiny_model(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path]
) -> None:
    config = str(tiny_config(tmp_path, tiny_phi3, tiny_data, per_device_train_batch_size=4))
    estimate, peak = estimated(config, [])["total"], measured(config, [], tmp_path / "run")
    assert abs(estimate - peak) / peak < 0.2, (estimate, peak)


def test_phi3_mini_is_checked_from_its_config_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The qlora preset against a directory with Phi-3-mini's config.json and a Phi-3-like tokenizer, no weights:
    the 3.8B model is built on the meta device, and `<|end|>` is found as the end of turn even though the
    tokenizer's placeholder vocabulary reads the probe answer as `<unk>`, itself a special token."""
    from transformers import Phi3Config

    model = tmp_path / "phi3-mini-config-only"
    Phi3Config(**PHI3_MINI, architectures=["Phi3ForCausalLM"]).save_pretrained(model)
    build_tokenizer(PHI3_MINI["vocab_size"]).save_pretrained(model)
    assert not list(model.glob("*.safetensors"))
    small = ["data.max_length=512", "training_config.per_device_train_batch_size=1"]  # fits any test machine
    sets = [a for s in [f"model.name_or_path={model}", *small] for a in ("--set", s)]
    status, report = run_check(capsys, "--config", "phi3-mini-4k-qlora", *sets)
    assert status == 0, report["errors"]
    assert report["model"]["parameters"] == 3_821_079_552
    # r=16 on every linear layer of 32: qkv (3072 -> 9216), o (3072 -> 3072), gate_up (3072 -> 16384), down
    per_layer = 16 * ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072))
    assert report["model"]["trainable"] == 32 * per_layer
    assert report["tokens"]["end_of_turn"] == "'<|end|>' (32007)"
    assert all(report["tokens"]["verdicts"].values())
    parts = report["memory"]["parts"]
    # NF4 linear layers (about 4.1 bits a weight with their scales); embeddings and head unpacked, at most fp32
    assert 3.6e9 * 0.5 < parts["weights"] < 3.6e9 * 0.52 + 0.2e9 * 4
