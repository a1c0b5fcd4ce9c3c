"""philora merge: an adapter folded into its base gives the same logits as base + adapter, the merged weights are
W + scale·B·A, saved sharded with a generation config that stops at the end of a turn; DoRA and converted PiSSA
adapters merge correctly; NaN adapters, occupied outputs and unconverted PiSSA adapters are refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from philora import cli
from philora.export import merge

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def random_adapter(base: Path, out: Path, seed: int = 0, **lora: object) -> Path:
    """A LoRA adapter on `base` with non-zero random B (so it changes the model), saved in peft's format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora}
    peft_model = get_peft_model(model, LoraConfig(**settings))  # type: ignore[arg-type]
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
            elif "lora_magnitude" in name:  # DoRA: move the magnitudes off the base's row norms too
                p.mul_(1 + 0.1 * torch.rand_like(p))
    peft_model.save_pretrained(out)
    return out


def run_merge(*args: str) -> int:
    return cli.main(["merge", *args])


@pytest.fixture(scope="module")
def embedded_merge(embedded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """The embedded model merged with a random adapter, in shards of at most 200 MB."""
    tmp = tmp_path_factory.mktemp("merge")
    adapter = random_adapter(embedded_dir, tmp / "adapter", target_modules=["qkv_proj", "down_proj"])
    out = tmp / "merged"
    return adapter, out, run_merge("--adapter", str(adapter), "--output", str(out), "--max-shard-size", "200MB")


def test_embedded_merge_matches_base_plus_adapter(embedded_merge: tuple[Path, Path, int]) -> None:
    _, out, rc = embedded_merge
    assert rc == 0
    record = json.loads((out / "merge.json").read_text())
    parity = record["parity"]
    assert record["passed"] and record["dtype"] == "float32" and parity["tolerance"] == 1e-4
    assert parity["relative"] <= 1e-4 and parity["top1_agreement"] == 1.0 and parity["positions"] > 60
    # The adapter moves the logits by whole units; the merged model is within a thousandth of that.
    assert record["adapter_effect_max_abs_diff"] > 0.5
    assert parity["max_abs_diff"] < record["adapter_effect_max_abs_diff"] / 1000


def test_merged_weights_are_base_plus_scaled_update(embedded_dir: Path, embedded_merge: tuple[Path, Path, int]) -> None:
    adapter, out, _ = embedded_merge
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2  # 540 MB of fp32 weights in shards of 200 MB
    merged = {k: v for shard in shards for k, v in load_file(out / shard).items()}
    base = load_file(embedded_dir / "model.safetensors")
    lora = load_file(adapter / "adapter_model.safetensors")
    for name in ("model.layers.0.self_attn.qkv_proj", "model.layers.29.mlp.down_proj"):
        a = lora[f"base_model.model.{name}.lora_A.weight"]
        b = lora[f"base_model.model.{name}.lora_B.weight"]
        expected = base[f"{name}.weight"] + (8 / 4) * b @ a
        torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=0, atol=1e-6)
        assert not torch.allclose(merged[f"{name}.weight"], base[f"{name}.weight"])
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.gate_up_proj.weight"):  # not adapted: unchanged
        assert torch.equal(merged[name], base[name])


def test_merged_model_stops_at_end_of_turn_and_keeps_its_template(
    embedded_dir: Path, embedded_merge: tuple[Path, Path, int]
) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    _, out, _ = embedded_merge
    tokenizer = AutoTokenizer.from_pretrained(out)
    generation = GenerationConfig.from_pretrained(out)
    end_of_turn, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn in generation.eos_token_id
    assert generation.pad_token_id == pad == tokenizer.pad_token_id and pad not in generation.eos_token_id
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(embedded_dir).chat_template
    assert json.loads((out / "merge.json").read_text())["stop_token_ids"] == [end_of_turn]


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_dora_adapter_merges_to_the_same_logits(tiny_phi3: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = random_adapter(tiny_phi3, tmp_path / "dora", use_dora=True)
    assert run_merge("--adapter", str(adapter), "--output", str(tmp_path / "out")) == 0
    ids = torch.randint(3, 49152, (1, 20), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    expected = logits(PeftModel.from_pretrained(base, adapter).eval(), ids)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged, ids), expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert (logits(AutoModelForCausalLM.from_pretrained(tiny_phi3), ids) - expected).abs().max() > 1e-3


def test_converted_pissa_adapter_merged_on_the_original_base_gives_the_trained_model(
    tiny_phi3: Path, tmp_path: Path
) -> None:
    """PiSSA rewrites the base into a residual; the adapter saved converted must merge onto the original base and
    give exactly what the trained model (residual + adapter) gave."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa_niter_4")
    trained = get_peft_model(model, config)
    config.init_lora_weights = True  # peft's convention for the saved starting point (as philora train does)
    trained.save_pretrained(tmp_path / "init")
    config.init_lora_weights = "pissa_niter_4"
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))  # "training"
    ids = torch.randint(3, 49152, (1, 20), generator=torch.Generator().manual_seed(0))
    expected = logits(trained.eval(), ids)
    trained.save_pretrained(tmp_path / "adapter", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    saved = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True  # converted: plain LoRA of twice the rank

    assert run_merge("--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "out")) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged, ids), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("value", "args", "message"),
    [
        (float("nan"), [], "1 adapter tensors hold NaN or inf (first: base_model.model.model.layers.1.mlp.down_proj"),
        (1e6, ["--dtype", "float16"], "the merged float16 weights hold NaN or inf"),  # finite in fp32, inf in fp16
    ],
)
def test_non_finite_weights_are_refused_and_nothing_is_saved(
    tiny_phi3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: float, args: list[str], message: str
) -> None:
    from safetensors.torch import save_file

    adapter = random_adapter(tiny_phi3, tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    name = next(k for k in tensors if "layers.1.mlp.down_proj.lora_B" in k)
    tensors[name][3, :] = value
    save_file(tensors, adapter / "adapter_model.safetensors")
    assert run_merge("--adapter", str(adapter), "--output", str(tmp_path / "out"), *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_qlora_adapter_merges_onto_full_precision_weights_in_bf16(
    tiny_phi3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An adapter from a 4-bit run (run.json says so) merges onto the original weights, saved in bf16."""
    run = tmp_path / "run"
    random_adapter(tiny_phi3, run / "adapter")
    model = {"name_or_path": str(tiny_phi3), "quantization": "4bit", "dtype": "auto"}
    (run / "run.json").write_text(json.dumps({"config": {"model": model}}))
    assert run_merge("--adapter", str(run), "--output", str(tmp_path / "out"), "--dtype", "bfloat16") == 0
    err = capsys.readouterr().err
    assert "trained on a 4bit base; loading the original weights unquantised" in err
    assert re.search(  # the parity line export prints too (test_cli_grammar.py)
        r"philora: merge \(bfloat16 weights read back vs base \+ adapter\) parity: max \|Δlogit\| \S+ \(\S+ of the "
        r"logit scale, tolerance 0\.05\), top-1 agreement [\d.]+% over \d+ positions: ok\n",
        err,
    ), err
    record = json.loads((tmp_path / "out/merge.json").read_text())
    assert record["base_trained_quantization"] == "4bit" and record["dtype"] == "bfloat16"
    assert 0 < record["parity"]["relative"] <= merge.TOLERANCE["bfloat16"]
    weights = load_file(tmp_path / "out/model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_a_merge_that_does_not_reproduce_the_adapter_fails_and_cannot_be_exported(
    tiny_phi3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = random_adapter(tiny_phi3, tmp_path / "adapter")
    real = merge.merge_weights

    def forget_one_layer(model: torch.nn.Module, path: Path, dtype: torch.dtype) -> torch.nn.Module:
        merged = real(model, path, dtype)
        with torch.no_grad():
            merged.model.layers[1].mlp.down_proj.weight.mul_(0.5)
        return merged

    monkeypatch.setattr(merge, "merge_weights", forget_one_layer)
    assert run_merge("--adapter", str(adapter), "--output", str(tmp_path / "out")) == 1
    assert "FAILED" in capsys.readouterr().err
    assert json.loads((tmp_path / "out/merge.json").read_text())["passed"] is False
    out = tmp_path / "gguf/m.gguf"
    out.parent.mkdir()
    assert cli.main(["export", "gguf", "--merged", str(tmp_path / "out"), "--output", str(out)]) == 2
    assert "failed the parity check" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("occupied", [], "already holds a model"),
        ("pissa", [], "pissa_niter_4 adapter saved unconverted"),
        ("plain", ["--max-shard-size", "lots"], "--max-shard-size lots: not a size"),
        ("missing", [], "no such directory"),
    ],
)
def test_bad_merge_requests_are_refused_before_any_work(
    tiny_phi3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, args: list[str], message: str
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": str(tiny_phi3), "r": 4, "init_lora_weights": True}
    if setup == "pissa":
        config["init_lora_weights"] = "pissa_niter_4"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    if setup == "missing":
        shutil.rmtree(adapter)
    out = tmp_path / "out"
    if setup == "occupied":
        out.mkdir()
        (out / "config.json").write_text("{}")
    assert run_merge("--adapter", str(adapter), "--output", str(out), *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_merged_model_is_written_with_the_users_umask(tiny_phi3: Path, tmp_path: Path) -> None:
    """The merged weights get the mode every other file gets (0o666 less the umask), not safetensors' 0600."""
    import os

    adapter = random_adapter(tiny_phi3, tmp_path / "adapter")
    assert run_merge("--adapter", str(adapter), "--output", str(tmp_path / "out")) == 0
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in modes and modes == dict.fromkeys(modes, 0o666 & ~mask)


def test_parse_size() -> None:
    assert merge.parse_size("2GB") == 2 * 10**9 and merge.parse_size("1.5GiB") == int(1.5 * 2**30)
    assert merge.parse_size("1000") == 1000


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_saves_in_the_dtype_the_run_trained_in_and_checks_parity_there(
    tiny_phi3: Path, tmp_path: Path, dtype: str
) -> None:
    """Without --dtype the merged weights take the run's dtype (run.json); parity is then judged by that dtype's
    rounding: 1e-4 of the logit scale in fp32, 5e-2 in bf16 (8 significant bits per weight)."""
    run = tmp_path / "run"
    random_adapter(tiny_phi3, run / "adapter")
    model = {"name_or_path": str(tiny_phi3), "dtype": "auto"}
    (run / "run.json").write_text(json.dumps({"config": {"model": model}, "model_dtype": dtype}))
    assert run_merge("--adapter", str(run), "--output", str(tmp_path / "out")) == 0
    record = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert record["dtype"] == dtype and record["passed"]
    assert record["parity"]["tolerance"] == merge.TOLERANCE[dtype]
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {getattr(torch, dtype)}


LIBRARIES = 300 * 2**20
MEASURE_MERGE = """
import json, sys
import torch, transformers  # the libraries a merge holds, in memory before the model is counted
from philora import cli, hardware
before = hardware.resident_bytes()
code = cli.main(["merge", *sys.argv[1:]])
print(json.dumps({"code": code, "before": before, "peak": hardware.resident_bytes("VmHWM")}))
"""


def test_merge_holds_one_model_in_its_stored_dtype(tmp_path: Path) -> None:
    # bound: the bf16 model as stored + its largest module in fp32 (while it computes) + what the merge imports and
    # reads besides (peft, the tokenizer: about 150 MiB); holding the model in fp32, as merges did, is twice the
    # stored model before anything else (measured 1.44 GB held here then, 0.91 GB now, the bound 0.98 GB)
    import os
    import subprocess
    import sys

    from philora import heap
    from scripts.make_real_shape import SHAPES, make

    shape = {**SHAPES["1b"], "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12,
             "num_attention_heads": 8, "num_key_value_heads": 8}  # fmt: skip
    base = tmp_path / "base"
    parameters = make(shape, base)
    stored, largest = 2 * parameters, 4 * 49152 * 1024  # bf16 on disk; the embedding (or head) in fp32
    adapter = random_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    merging = ["--adapter", str(adapter), "--base", str(base), "--output", str(out)]
    env = {k: v for k, v in os.environ.items() if k != heap.SWITCH}  # as a user's merge runs: heap limited
    done = subprocess.run([sys.executable, "-c", MEASURE_MERGE, *merging], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["code"] == 0, done.stderr[-2000:]
    assert json.loads((out / "merge.json").read_text())["dtype"] == "bfloat16"
    held = measured["peak"] - measured["before"]
    assert held < stored + largest + LIBRARIES, (held / 2**20, stored / 2**20)
