"""QLoRA: training on a 4-bit base, in the run's dtype on a CPU, with gradients that survive an evaluation; and a
run that does not quantise never importing bitsandbytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, tiny_config

from philora.config import load_config
from philora.train.run import train


def test_qlora_trains_on_a_4bit_base(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path]) -> None:
    pytest.importorskip("bitsandbytes")
    path = tiny_config(tmp_path, tiny_phi3, tiny_data, predict_with_generate=False, max_steps=2, eval_strategy="no")
    config = load_config(str(path), ["model.quantization=4bit", "model.dtype=bfloat16",
                                     f"training_config.output_dir={tmp_path / 'q'}"])  # fmt: skip
    result = train(config)
    layer = result.model.base_model.model.model.layers[0].self_attn.qkv_proj
    assert type(layer.base_layer).__name__ == "Linear4bit"
    records = read_jsonl(result.output_dir / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert (result.output_dir / "adapter/adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("switch", "dtype"), [("0", torch.float32), ("1", torch.bfloat16)])
def test_qlora_on_the_cpu_computes_in_the_runs_dtype(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, switch: str,
    dtype: torch.dtype,
) -> None:  # fmt: skip
    """fp32 where bf16 is not native (emulated bf16 made one step of a 3.8B QLoRA run take over 11 minutes)."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("PHILORA_CPU_BF16", switch)
    path = tiny_config(tmp_path, tiny_phi3, tiny_data, predict_with_generate=False, max_steps=1, eval_strategy="no")
    config = load_config(str(path), ["model.quantization=4bit", "model.dtype=auto",
                                     f"training_config.output_dir={tmp_path / 'q'}"])  # fmt: skip
    layer = train(config).model.base_model.model.model.layers[0].mlp.down_proj.base_layer
    assert type(layer).__name__ == "Linear4bit" and layer.compute_dtype == dtype
    assert layer(torch.zeros(1, layer.in_features, dtype=dtype)).dtype == dtype


def test_qlora_gradients_are_the_same_after_an_evaluation_on_the_cpu(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path]
) -> None:
    """bitsandbytes repacks a 4-bit weight for CPU inference on its first eval-mode forward without gradients
    (on CPUs with AVX512-BF16), after which nothing flows back through it; a run evaluates and generates."""
    pytest.importorskip("bitsandbytes")
    from philora.train import run as train_run

    path = tiny_config(tmp_path, tiny_phi3, tiny_data)  # answers the eval prompts with the base model first
    config = load_config(str(path), ["model.quantization=4bit", "model.dtype=bfloat16", "peft_config.lora_dropout=0",
                                     f"training_config.output_dir={tmp_path / 'q'}"])  # fmt: skip
    run = train_run.set_up(config, None)
    train_run.build(run)
    batch, _ = run.objective.step(run.plan.micro_batches(0), run.plan).batches[0]

    def lora_gradients() -> dict[str, torch.Tensor]:
        run.loss_fn.train()
        run.loss_fn.zero_grad(set_to_none=True)
        run.loss_fn(**batch)[0].backward()
        return {n: p.grad.clone() for n, p in run.loss_fn.named_parameters() if p.requires_grad}

    before = lora_gradients()
    run.loss_fn.eval()
    with torch.no_grad():  # an evaluation inside the run
        run.loss_fn(**batch)
    after = lora_gradients()
    assert before.keys() == after.keys() and len(before) == 16
    for name, grad in before.items():
        assert torch.equal(after[name], grad), name
    # nor did the base model's answers before training repack them (which would make both gradients wrong alike)
    layers = [m for m in run.loss_fn.modules() if type(m).__module__.startswith("bitsandbytes")]
    assert len(layers) == 8 and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


@pytest.mark.slow
def test_a_run_that_does_not_quantize_never_imports_bitsandbytes(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path]
) -> None:
    """peft imports bitsandbytes whenever it is installed, and on AVX512-BF16 CPUs that import logs a warning about
    a kernel it cannot fetch. A plain LoRA run (and eval of it) keeps it out; a QLoRA run after it in the same
    process still finds it."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    path = tiny_config(tmp_path, tiny_phi3, tiny_data, max_steps=2, eval_strategy="no", predict_with_generate=False)
    script = f"""
import sys
from philora import cli
assert cli.main(["train", "--config", {str(path)!r}, "--output", {str(tmp_path / "plain")!r}]) == 0
assert cli.main(["eval", "--adapter", {str(tmp_path / "plain")!r}, "--data", {str(tiny_data[1])!r},
                 "--max-new-tokens", "2", "--no-base"]) == 0
print("plain run imported bitsandbytes:", "bitsandbytes" in sys.modules)
assert cli.main(["train", "--config", {str(path)!r}, "--output", {str(tmp_path / "q")!r},
                 "--set", "model.quantization=4bit", "--set", "model.dtype=bfloat16"]) == 0
print("4-bit run imported bitsandbytes:", "bitsandbytes" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plain run imported bitsandbytes: False" in done.stdout
    assert "4-bit run imported bitsandbytes: True" in done.stdout
