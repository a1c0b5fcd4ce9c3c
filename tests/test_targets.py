"""LoRA targets on Phi-3: all four fused projections by default; names that match nothing are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from philora.config import ModelSection, PeftSection
from philora.errors import UserError
from philora.lora.targets import apply_lora, resolve_targets
from philora.model.load import load_model

PHI3_LINEAR = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


@pytest.fixture
def tiny(tiny_phi3: Path):
    return load_model(ModelSection(name_or_path=str(tiny_phi3)), training=True)


def test_all_linear_is_the_four_phi3_projections(tiny) -> None:
    assert resolve_targets(tiny, "all-linear") == PHI3_LINEAR


def test_cookbook_names_are_refused_with_the_real_ones(tiny) -> None:
    with pytest.raises(UserError) as e:
        resolve_targets(tiny, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj"])
    message = e.value.problems[0]
    assert "q_proj, k_proj, v_proj, gate_proj, up_proj match no module of Phi3ForCausalLM" in message
    assert "use gate_up_proj, qkv_proj" in message
    assert "its linear layers are down_proj, gate_up_proj, o_proj, qkv_proj" in message


def test_two_unfused_names_are_refused(tiny) -> None:
    with pytest.raises(UserError, match="q_proj, v_proj match no module"):
        resolve_targets(tiny, ["q_proj", "v_proj"])


def test_full_and_short_names_are_accepted(tiny) -> None:
    assert resolve_targets(tiny, ["qkv_proj", "model.layers.0.mlp.down_proj"]) == [
        "qkv_proj",
        "model.layers.0.mlp.down_proj",
    ]


def test_apply_lora_reports_modules_and_exact_counts(tiny, capsys: pytest.CaptureFixture[str]) -> None:
    peft_model = apply_lora(tiny, PeftSection(r=4, lora_alpha=8, lora_dropout=0.0))
    # Per layer, r * (in + out) for qkv 32->64, o 32->32, gate_up 32->128, down 64->32; two layers.
    expected = 2 * 4 * ((32 + 64) + (32 + 32) + (32 + 128) + (64 + 32))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == expected
    err = capsys.readouterr().err
    assert "LoRA on 8 modules (down_proj x2, gate_up_proj x2, o_proj x2, qkv_proj x2)" in err
    assert f"{expected:,} trainable" in err
