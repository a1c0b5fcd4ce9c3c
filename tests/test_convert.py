"""Adapter conversions: unfused <-> fused names round-trip exactly, a converted adapter gives the same logits on the
re-laid Phi-3 model, and loralib state dicts become PEFT tensors with the same update."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from philora import lora
from philora.errors import UserError
from philora.lora.convert import (
    convert_adapter,
    fused_to_split,
    loralib_to_peft,
    peft_to_loralib,
    split_to_fused,
)
from philora.model.embedded import phi3_config_from_llama, phi3_state_dict_from_llama
from philora.model.layout import part_rows

UNFUSED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_and_phi3():
    """A tiny random Llama (GQA 4/2) and the same weights re-laid as Phi-3."""
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3ForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=10000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).eval()
    phi3 = Phi3ForCausalLM(phi3_config_from_llama(config)).eval()
    phi3.load_state_dict(phi3_state_dict_from_llama(llama.state_dict(), 2), strict=False)
    phi3.tie_weights()
    ids = torch.randint(64, (1, 12))
    torch.testing.assert_close(phi3(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)
    return llama, phi3, ids


def random_lora(model, targets: list[str], tmp: Path, r: int = 4, **extra) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=targets, **extra))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    peft_model.save_pretrained(tmp)
    peft_model.unload()
    return tmp


@pytest.mark.parametrize("targets", [UNFUSED, ["q_proj", "v_proj", "up_proj"]])
def test_unfused_adapter_fused_gives_the_same_logits_and_round_trips(llama_and_phi3, tmp_path: Path, targets) -> None:
    import copy

    from peft import PeftModel
    from safetensors.torch import load_file

    llama, phi3, ids = llama_and_phi3
    split = random_lora(copy.deepcopy(llama), targets, tmp_path / "split")
    convert_adapter(split, tmp_path / "fused", "fused", llama.config)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(copy.deepcopy(llama), split).eval()(ids).logits
        fused = PeftModel.from_pretrained(copy.deepcopy(phi3), tmp_path / "fused").eval()(ids).logits
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    convert_adapter(tmp_path / "fused", tmp_path / "back", "split", llama.config)
    original, back = (
        load_file(split / "adapter_model.safetensors"),
        load_file(tmp_path / "back/adapter_model.safetensors"),
    )
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[k], back[k]) for k in original)  # exactly the tensors we started from
    with torch.no_grad():
        again = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "back").eval()(ids).logits
    torch.testing.assert_close(again, expected, rtol=1e-6, atol=1e-6)


def test_an_ordinary_fused_adapter_splits_with_the_same_logits(llama_and_phi3, tmp_path: Path) -> None:
    import copy

    from peft import PeftModel

    llama, phi3, ids = llama_and_phi3
    fused = random_lora(
        copy.deepcopy(phi3), ["qkv_proj", "gate_up_proj", "o_proj"], tmp_path / "fused", use_rslora=True
    )
    convert_adapter(fused, tmp_path / "split", "split", llama.config)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(copy.deepcopy(phi3), fused).eval()(ids).logits
        split = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "split").eval()(ids).logits
    torch.testing.assert_close(split, expected, rtol=1e-5, atol=1e-5)


def test_dora_adapters_are_not_split(llama_and_phi3) -> None:
    with pytest.raises(UserError, match="DoRA"):
        split_to_fused({}, {"use_dora": True}, part_rows(llama_and_phi3[0].config))
    with pytest.raises(UserError, match="DoRA"):
        fused_to_split({}, {"use_dora": True}, part_rows(llama_and_phi3[0].config))


def test_loralib_state_dict_becomes_peft_tensors_with_the_same_update() -> None:
    torch.manual_seed(0)
    qkv = lora.MergedLinear(16, 32, r=2, lora_alpha=4, enable_lora=[True, False, True], slices=[16, 8, 8])
    out = lora.Linear(16, 16, r=2, lora_alpha=4)
    with torch.no_grad():
        qkv.lora_B.normal_()
        out.lora_B.normal_()
    model = torch.nn.ModuleDict({"qkv_proj": qkv, "o_proj": out})
    state, fields = loralib_to_peft(lora.lora_state_dict(model), 2, 4, {"qkv_proj": ([16, 8, 8], [True, False, True])})
    for name, layer in model.items():
        a = state[f"base_model.model.{name}.lora_A.weight"]
        b = state[f"base_model.model.{name}.lora_B.weight"]
        rank = fields["rank_pattern"].get(name, fields["r"])
        alpha = fields["alpha_pattern"].get(name, fields["lora_alpha"])
        torch.testing.assert_close(b @ a * (alpha / rank), layer.delta_weight())
    assert fields["target_modules"] == ["o_proj", "qkv_proj"] and fields["rank_pattern"] == {"qkv_proj": 4}
    back, settings = peft_to_loralib(state, fields)
    assert torch.equal(back["o_proj.lora_A"], out.lora_A) and torch.equal(back["o_proj.lora_B"], out.lora_B)
    assert settings == {"o_proj": (2, 4), "qkv_proj": (4, 8.0)}
    rebuilt = lora.Linear(16, 32, r=4, lora_alpha=8)
    rebuilt.weight.data.copy_(qkv.weight)
    rebuilt.bias.data.copy_(qkv.bias)
    rebuilt.load_state_dict({"lora_A": back["qkv_proj.lora_A"], "lora_B": back["qkv_proj.lora_B"]}, strict=False)
    x = torch.randn(3, 16)
    torch.testing.assert_close(rebuilt(x), qkv(x))
