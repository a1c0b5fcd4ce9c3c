"""GGUF export beyond Phi-3's layout (Llama, Mistral, Qwen2), llama.cpp's quantized types, and adapters as GGUF
LoRA, each loaded by llama.cpp itself and compared with transformers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from philora import cli
from philora.export import layouts

COMMON = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "bos_token_id": 1,
          "eos_token_id": 2, "pad_token_id": 0}  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip


def tiny(kind: str, tokenizer: Path, path: Path, **config: object) -> Path:
    """A 2-layer random model of `kind` (GQA 4/2 heads, 64 wide) with the embedded model's tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "phi3": "Phi3"}[kind]
    settings = {**COMMON, **config}
    model_config = getattr(transformers, f"{name}Config")(**settings)
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(model_config)
    for module in model.modules():  # Qwen2's q/k/v biases start at zero; make them count
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.5)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(path)
    return path


def export(*args: str) -> tuple[int, dict]:
    output = Path(args[args.index("--output") + 1])
    status = cli.main(["export", *args])
    sidecar = output.with_suffix(".export.json")
    return status, json.loads(sidecar.read_text()) if sidecar.is_file() else {}


@pytest.mark.parametrize(
    ("kind", "config", "arch"),
    [
        ("llama", {"tie_word_embeddings": True}, "llama"),
        ("llama", {"rope_parameters": LLAMA3_ROPE}, "llama"),
        ("mistral", {"sliding_window": None}, "llama"),
        ("qwen2", {"tie_word_embeddings": True}, "qwen2"),
    ],
    ids=["llama-tied", "llama3-rope", "mistral", "qwen2-biases"],
)
def test_other_architectures_agree_in_llama_cpp(
    embedded_tokenizer: Path, tmp_path: Path, kind: str, config: dict, arch: str
) -> None:
    model = tiny(kind, embedded_tokenizer, tmp_path / "model", **config)
    status, record = export("gguf", "--merged", str(model), "--output", str(tmp_path / "m.gguf"))
    assert status == 0 and record["passed"] and record["architecture"] == arch
    assert record["tokenizer_identical"] and record["parity"]["top1_agreement"] >= 0.98
    assert record["parity"]["relative"] <= 1e-2


def test_llama_without_the_rotary_row_order_fails_in_llama_cpp(
    embedded_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check can fail: Llama's q/k rows written in transformers' order give llama.cpp other logits."""
    model = tiny("llama", embedded_tokenizer, tmp_path / "model")
    monkeypatch.setattr(layouts, "permute_rotary", lambda weight, heads: weight)
    status, record = export("gguf", "--merged", str(model), "--output", str(tmp_path / "m.gguf"))
    assert status == 1 and not record["passed"] and record["parity"]["relative"] > 1e-2


def test_permute_rotary_pairs_each_heads_halves() -> None:
    rows = torch.arange(8.0).unsqueeze(1)  # 2 heads of 4 rows: halves [0 1 | 2 3], [4 5 | 6 7]
    assert layouts.permute_rotary(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_llama3_rope_factors_keep_short_wavelengths_and_slow_long_ones() -> None:
    from transformers import LlamaConfig

    factors = layouts.llama3_rope_factors(LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE))
    assert len(factors) == 8 and 1.0 < factors[0] < 8.0 and factors[-1] == 8.0  # 2π is between 16/4 and 16/1
    assert all(a <= b for a, b in itertools.pairwise(factors))


def save_adapter(model_dir: Path, path: Path, targets: list[str], **lora: object) -> Path:
    """A random (B ≠ 0) peft LoRA on the model, as a user's trained adapter would be saved."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **lora)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.5)
    peft_model.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("kind", "targets", "lora"),
    [
        ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], {"rank_pattern": {"o_proj": 2}}),
        ("llama", ["q_proj", "k_proj", "v_proj", "down_proj"], {"use_rslora": True}),
    ],
)
def test_gguf_lora_on_a_base_gguf_matches_base_plus_adapter(
    embedded_tokenizer: Path, tmp_path: Path, kind: str, targets: list[str], lora: dict
) -> None:
    """Per-module scales (rank_pattern, rsLoRA) folded into B; Llama's q/k rows reordered in B as in the base."""
    model = tiny(kind, embedded_tokenizer, tmp_path / "model")
    adapter = save_adapter(model, tmp_path / "adapter", targets, **lora)
    out = tmp_path / "adapter.gguf"
    status, record = export("gguf-lora", "--adapter", str(adapter), "--base", str(model), "--output", str(out))
    assert status == 0 and record["passed"] and record["base_type"] == "f16"
    assert record["parity"]["top1_agreement"] >= 0.98 and record["parity"]["relative"] <= 1e-2
    import gguf

    reader = gguf.GGUFReader(str(out))
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    names = {t.name for t in reader.tensors}
    assert "blk.1.attn_qkv.weight.lora_a" in names if kind == "phi3" else "blk.1.attn_k.weight.lora_b" in names


def test_gguf_lora_is_checked_on_the_users_quantized_base(embedded_tokenizer: Path, tmp_path: Path) -> None:
    """--base-gguf: the check runs on the user's own base GGUF, judged by that file's type (here q8_0)."""
    model = tiny("phi3", embedded_tokenizer, tmp_path / "model")
    adapter = save_adapter(model, tmp_path / "adapter", ["qkv_proj", "down_proj"])
    base = tmp_path / "base.gguf"
    assert export("gguf", "--merged", str(model), "--output", str(base), "--type", "q8_0")[0] == 0
    status, record = export(
        "gguf-lora", "--adapter", str(adapter), "--base-gguf", str(base), "--output", str(tmp_path / "a.gguf")
    )
    assert status == 0 and record["base_type"] == "q8_0" and record["base_gguf"] == str(base)


def test_gguf_lora_refuses_dora(embedded_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny("phi3", embedded_tokenizer, tmp_path / "model")
    adapter = save_adapter(model, tmp_path / "adapter", ["o_proj"], use_dora=True)
    assert cli.main(["export", "gguf-lora", "--adapter", str(adapter), "--output", str(tmp_path / "a.gguf")]) == 2
    assert "plain LoRA on linear layers only" in capsys.readouterr().err
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("qtype", ["q4_k_m", "q5_k_m", "q4_0", "bf16"])
def test_quantized_types_of_the_embedded_model_pass_llama_cpp(embedded_dir: Path, tmp_path: Path, qtype: str) -> None:
    """llama.cpp's quantizer makes the k-quants and q4_0 (with its fallbacks for 576-wide rows), gguf-py bf16."""
    import gguf

    out = tmp_path / f"{qtype}.gguf"
    status, record = export("gguf", "--merged", str(embedded_dir), "--output", str(out), "--type", qtype)
    assert status == 0 and record["passed"]
    by_llama_cpp = qtype != "bf16"
    assert record["written_by"].startswith("llama.cpp llama_model_quantize") == by_llama_cpp
    assert not any(p.name.endswith("f16-tmp.gguf") for p in tmp_path.iterdir())
    field = gguf.GGUFReader(str(out)).get_field("general.file_type")
    assert int(field.contents()) == int(gguf.LlamaFileType[f"MOSTLY_{qtype.upper()}"])


def test_a_file_llama_cpp_refuses_is_reported_with_its_reason(
    embedded_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from philora.export import vocab

    model = tiny("llama", embedded_tokenizer, tmp_path / "model")
    monkeypatch.setattr(vocab, "pre_tokenizer_name", lambda pre, normalizer: "no-such-split")
    status, record = export("gguf", "--merged", str(model), "--output", str(tmp_path / "m.gguf"))
    assert status == 1 and not record["passed"] and "no-such-split" in record["load_error"]
    assert "llama.cpp does not load it" in capsys.readouterr().err
