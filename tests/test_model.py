"""Model loading: dtype choice, attention checks, and one-line errors for missing or unreachable models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from philora import hardware
from philora.config import ModelSection
from philora.errors import UserError
from philora.model.load import load_model


def test_auto_dtype_is_bf16_only_where_it_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert hardware.resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert hardware.resolve_dtype("auto", cpu) == torch.bfloat16
    assert hardware.resolve_dtype("float16", cpu) == torch.float16


def test_the_bf16_switch_overrides_the_cpu_detection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_phi3: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from philora import cli

    cpu = torch.device("cpu")
    for value, dtype in (("1", torch.bfloat16), ("0", torch.float32)):
        monkeypatch.setenv("PHILORA_CPU_BF16", value)
        assert hardware.resolve_dtype("auto", cpu) == dtype
        assert hardware.resolve_dtype("float32", cpu) == torch.float32  # a named dtype is never overridden
    monkeypatch.delenv("PHILORA_CPU_BF16")
    assert hardware.cpu_has_fast_bf16() == hardware.cpu_detects_bf16()
    monkeypatch.setenv("PHILORA_CPU_BF16", "yes")
    with pytest.raises(UserError, match=r"PHILORA_CPU_BF16='yes': use 1 .* or 0"):
        hardware.resolve_dtype("auto", cpu)
    out = tmp_path / "o"
    code = cli.main(["train", "--output", str(out), "--set", f"model.name_or_path={tiny_phi3}", "--set",
                     "training_config.max_steps=1", "--set", "data.max_eval_samples=2"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "philora: error: $PHILORA_CPU_BF16='yes'" in err and "Traceback" not in err


def test_use_cache_off_for_training_on_for_generation(tiny_phi3: Path) -> None:
    section = ModelSection(name_or_path=str(tiny_phi3), dtype="bfloat16", attn_implementation="eager")
    model = load_model(section, training=True)
    assert model.config.use_cache is False and model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert load_model(section, training=False).config.use_cache is True


def test_flash_attention_on_cpu_is_a_clear_error(tiny_phi3: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="flash_attention_2 needs a CUDA GPU; use sdpa"):
        load_model(ModelSection(name_or_path=str(tiny_phi3), attn_implementation="flash_attention_2"), training=True)


def test_missing_local_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such directory"):
        load_model(ModelSection(name_or_path=str(tmp_path / "nope")), training=True)
    with pytest.raises(UserError, match=r"has no config\.json"):
        load_model(ModelSection(name_or_path=str(tmp_path)), training=True)


def test_unreachable_hub_id_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(UserError) as e:
        load_model(ModelSection(name_or_path="microsoft/Phi-3-mini-4k-instruct"), training=True)
    (message,) = e.value.problems
    assert "\n" not in message and "microsoft/Phi-3-mini-4k-instruct" in message and "offline" in message
    assert "hf download microsoft/Phi-3-mini-4k-instruct" in message
