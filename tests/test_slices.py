"""Presets, per-slice LoRA inside Phi-3's fused projections, and peft's LoRA variants — all saved as adapters that
plain peft loads with the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_yaml

from philora.config import ModelSection, PeftSection
from philora.data.batching import collate
from philora.data.render import ChatEncoder
from philora.errors import UserError
from philora.lora.targets import apply_lora, trainable_parameters
from philora.model.load import load_model, load_tokenizer
from philora.model.loss import TokenLoss

# tiny Phi-3: hidden 32, 4 heads of 8 (q 32), 2 kv heads (k 16, v 16), intermediate 64, 2 layers; r = 4
PRESET_COUNTS = {
    "all-linear": 2 * 4 * ((32 + 64) + (32 + 32) + (32 + 128) + (64 + 32)),
    "attention": 2 * 4 * ((32 + 64) + (32 + 32)),
    "mlp": 2 * 4 * ((32 + 128) + (64 + 32)),
    "qv": 2 * (2 * 4 * 32 + 4 * (32 + 16)),  # A: 2r x hidden; B: r columns for q's 32 rows and v's 16
}
CHAT = [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": "Something, said."}]


def base(path: Path):
    torch.manual_seed(0)
    return load_model(ModelSection(name_or_path=str(path), dtype="float32"), training=True)


@pytest.mark.parametrize("preset", sorted(PRESET_COUNTS))
def test_preset_trainable_counts(preset: str, tiny_phi3: Path, capsys: pytest.CaptureFixture) -> None:
    model = apply_lora(base(tiny_phi3), PeftSection(r=4, lora_alpha=8, target_modules=preset))
    assert trainable_parameters(model)[0] == PRESET_COUNTS[preset]
    assert f"{PRESET_COUNTS[preset]:,} trainable" in capsys.readouterr().err


def qkv_outputs(model, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's adapted qkv_proj output, and what its frozen base layer gives for the same input."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, inputs, out) -> None:
        seen.append((out.detach().clone(), module.base_layer(inputs[0]).detach().clone()))

    hooks = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith("self_attn.qkv_proj")]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    for h in hooks:
        h.remove()
    return seen


def train_steps(model, batch: dict, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.1)
    loss_fn = TokenLoss(model)
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = loss_fn(**batch)
        (loss / (batch["labels"][:, 1:] != -100).sum()).backward()
        optimizer.step()


def check_qv(path: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    tokenizer = load_tokenizer(ModelSection(name_or_path=str(path)))
    batch = collate([ChatEncoder(tokenizer).encode(CHAT)], [[0]], tokenizer.pad_token_id)
    model = apply_lora(base(path), PeftSection(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="qv"))
    config = model.get_base_model().config
    q = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    train_steps(model, batch)
    for adapted, frozen in qkv_outputs(model, batch):
        assert torch.equal(adapted[..., q : q + kv], frozen[..., q : q + kv])  # k: exactly the base model's
        assert not torch.allclose(adapted[..., :q], frozen[..., :q])  # q and v moved
        assert not torch.allclose(adapted[..., q + kv :], frozen[..., q + kv :])
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["qkv_proj"] and saved["rank_pattern"] == {"qkv_proj": 8}
    plain = PeftModel.from_pretrained(base(path), tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        theirs = plain(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_qv_on_tiny_phi3_leaves_k_exact_and_loads_in_plain_peft(tiny_phi3: Path, tmp_path: Path) -> None:
    check_qv(tiny_phi3, tmp_path)


def test_qv_on_the_embedded_model(embedded_dir: Path, tmp_path: Path) -> None:
    check_qv(embedded_dir, tmp_path)


def test_slice_specs_are_checked(tiny_phi3: Path) -> None:
    model = base(tiny_phi3)
    with pytest.raises(UserError, match=r"qkv_proj has slices q, k, v; name one or more"):
        apply_lora(model, PeftSection(target_modules=["qkv_proj:x"]))
    with pytest.raises(UserError, match=r"slices are for fused modules \(qkv_proj, gate_up_proj\), not 'o_proj'"):
        apply_lora(model, PeftSection(target_modules=["o_proj:q"]))
    with pytest.raises(UserError, match="DoRA rescales every output row"):
        apply_lora(model, PeftSection(target_modules="qv", use_dora=True))
    with pytest.raises(UserError, match="'pissa' starts B away from zero"):
        apply_lora(model, PeftSection(target_modules=["gate_up_proj:up"], init_lora_weights="pissa"))


def tiny_run(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], name: str, peft: str):
    from philora.config import load_config
    from philora.train.run import train

    path = write_yaml(
        tmp_path / f"{name}.yaml",
        f"""
model: {{name_or_path: {tiny_phi3}, dtype: float32}}
data: {{train: {tiny_data[0]}, max_length: 256}}
peft_config: {{r: 4, lora_alpha: 8, lora_dropout: 0.0, {peft}}}
training_config:
  max_steps: 2
  per_device_train_batch_size: 4
  learning_rate: 5.0e-2
  logging_steps: 1
  save_steps: 100
  predict_with_generate: false
  output_dir: {tmp_path / name}
""",
    )
    return train(load_config(str(path)))


@pytest.mark.parametrize(
    ("name", "peft"),
    [
        ("qv", "target_modules: qv"),
        ("up-only", "target_modules: [gate_up_proj:up, o_proj]"),
        ("dora", "use_dora: true"),
        ("rslora", "use_rslora: true"),
        ("pissa", "init_lora_weights: pissa"),
        ("olora", "init_lora_weights: olora"),
        ("modules-to-save", "target_modules: attention, modules_to_save: [lm_head]"),
    ],
)
def test_variants_train_and_load_on_the_original_base_in_plain_peft(
    name: str, peft: str, tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path]
) -> None:
    from peft import PeftModel

    result = tiny_run(tmp_path, tiny_phi3, tiny_data, name, peft)
    tokenizer = load_tokenizer(ModelSection(name_or_path=str(tiny_phi3)))
    batch = collate([ChatEncoder(tokenizer).encode(CHAT)], [[0]], tokenizer.pad_token_id)
    plain = PeftModel.from_pretrained(base(tiny_phi3), result.output_dir / "adapter").eval()
    trained = result.model.eval()
    with torch.no_grad():
        original = base(tiny_phi3).eval()(input_ids=batch["input_ids"]).logits
        ours = trained(input_ids=batch["input_ids"]).logits
        theirs = plain(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(ours, original, atol=1e-3)  # training moved the model
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_pissa_adapter_is_converted_to_the_original_base(tmp_path: Path, tiny_phi3: Path) -> None:
    """PiSSA rewrites the base weights; the saved adapter must reproduce the trained model on the original ones."""
    from peft import PeftModel

    tokenizer = load_tokenizer(ModelSection(name_or_path=str(tiny_phi3)))
    batch = collate([ChatEncoder(tokenizer).encode(CHAT)], [[0]], tokenizer.pad_token_id)
    model = apply_lora(base(tiny_phi3), PeftSection(r=4, lora_alpha=4, lora_dropout=0.0, init_lora_weights="pissa"))
    from philora.train.output import save_initial_adapter

    initial = save_initial_adapter(model, tmp_path, PeftSection(init_lora_weights="pissa"))
    train_steps(model, batch, steps=2)
    model.save_pretrained(tmp_path / "adapter", path_initial_model_for_weight_conversion=initial)
    plain = PeftModel.from_pretrained(base(tiny_phi3), tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"]).logits
        theirs = plain(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_qlora_trains_the_embedded_model_and_loads_on_the_full_precision_base(
    embedded_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    from philora import cli

    out = tmp_path / "qlora"
    settings = [
        "model.quantization=4bit",
        "training_config.max_steps=1",
        "training_config.warmup_ratio=0",
        "training_config.predict_with_generate=false",
        "training_config.eval_strategy=no",
        "data.max_length=96",
        "data.max_eval_samples=2",
    ]
    assert cli.main(["train", *[a for s in settings for a in ("--set", s)], "--output", str(out)]) == 0
    tokenizer = load_tokenizer(ModelSection())
    batch = collate([ChatEncoder(tokenizer).encode(CHAT)], [[0]], tokenizer.pad_token_id)
    full = PeftModel.from_pretrained(base(embedded_dir), out / "adapter").eval()
    with torch.no_grad():
        tuned = full(input_ids=batch["input_ids"]).logits
        with full.disable_adapter():
            original = full(input_ids=batch["input_ids"]).logits
    assert torch.isfinite(tuned).all() and not torch.allclose(tuned, original, atol=1e-3)
