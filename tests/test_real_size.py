"""Real size: the real-shape maker writes the published shapes, loads read each tensor rather than map the file, and
a 1B-class model trains within its memory estimate (bench/real_size.py measures 3.8B)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from memory_estimate import estimated, measured  # noqa: E402

from scripts.make_real_shape import SHAPES, make, phi3_config  # noqa: E402

TOKENIZER_SIZE = 49152  # the embedded tokenizer the shapes are made with

# a shape small enough for the fast tier, with Phi-4-mini's features (GQA, partial rotary, longrope, tied head)
SMALL = {**SHAPES["phi4-mini"], "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50000}  # fmt: skip


def meta_parameters(config: object) -> int:
    from transformers import Phi3ForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in Phi3ForCausalLM(config).parameters())


@pytest.mark.parametrize(
    ("shape", "parameters"),
    # Phi-4-mini: 3.84B as published; Phi-3-mini: 3.82B with its 32,064 rows, 3.93B with the embedded tokenizer's
    [("phi4-mini", 3.836e9), ("phi3-mini-4k", 3.926e9), ("1b", 1.023e9)],
)
def test_shapes_are_the_published_ones(shape: str, parameters: float) -> None:
    config = phi3_config(SHAPES[shape], TOKENIZER_SIZE)
    assert meta_parameters(config) == pytest.approx(parameters, rel=1e-3)
    assert config.hidden_size in (2048, 3072)
    if shape == "phi4-mini":
        assert config.vocab_size == 200064 and config.tie_word_embeddings
        assert (config.num_attention_heads, config.num_key_value_heads) == (24, 8)
        rope = config.rope_parameters
        assert rope["rope_type"] == "longrope" and rope["partial_rotary_factor"] == 0.75
        assert len(rope["short_factor"]) == 48  # 128 dims a head, 3/4 of them rotated, a factor per pair


def test_made_model_loads_and_trains_with_philora(tmp_path: Path) -> None:
    from philora.config import ModelSection
    from philora.model.load import load_model, load_tokenizer

    path = tmp_path / "small"
    count = make(SMALL, path)
    assert count == meta_parameters(phi3_config(SMALL, TOKENIZER_SIZE))
    section = ModelSection(name_or_path=str(path), dtype="float32")
    model, tokenizer = load_model(section, training=True), load_tokenizer(section, say_pad=False)
    assert model.config.vocab_size == 50000 and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == count
    weights = model.get_input_embeddings().weight
    assert weights.dtype == torch.float32 and 0.015 < float(weights.detach().std()) < 0.025  # drawn, not zeros
    ids = torch.tensor([tokenizer.encode("hello there")])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_cpu_loads_read_tensors_instead_of_mapping_the_file(tiny_phi3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a mapped file's converted pages stay resident until the load ends: 23.6 GB to load a 3.8B bf16 model in fp32
    from transformers import modeling_utils

    from philora.config import ModelSection
    from philora.model.load import load_model

    backends: list[str] = []
    opened = modeling_utils.safe_open

    def spy(file: str, *args: object, **kwargs: object) -> object:
        backends.append(str(kwargs.get("backend")))
        return opened(file, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_open", spy)
    load_model(ModelSection(name_or_path=str(tiny_phi3), dtype="float32"), training=False)
    assert backends == ["pread"]
    assert modeling_utils.safe_open is spy  # put back as it was


@pytest.mark.slow
def test_a_1b_model_trains_within_15_percent_of_its_memory_estimate(tmp_path: Path) -> None:
    # the whole process's peak, loading included: before loads read tensor by tensor, fp32's peak was at load,
    # 27% above the estimate (the mapped bf16 file on top of the fp32 weights)
    path = tmp_path / "1b"
    make("1b", path)
    settings = [f"model.name_or_path={path}", "data.max_length=512", "data.cache=false",
                "training_config.per_device_train_batch_size=1", "training_config.gradient_accumulation_steps=1",
                "training_config.gradient_checkpointing=true"]  # fmt: skip
    estimate = estimated("phi3-mini-4k-lora", settings)["total"]
    peak = measured("phi3-mini-4k-lora", settings, tmp_path / "run")
    assert abs(estimate - peak) / peak < 0.15, (estimate, peak)


@pytest.mark.parametrize(
    ("before", "set_"),
    [
        ("", True),
        ("os.environ['PHILORA_HEAP'] = '0'; ", False),
        ("os.environ['LD_PRELOAD'] = 'libjemalloc.so.2'; ", False),
    ],
    ids=["glibc", "switched off", "another allocator"],
)
def test_merge_and_export_limit_the_heap_unless_told_not_to(before: str, set_: bool) -> None:
    # in a process of its own: the setting lasts for the process (conftest switches it off for the test session)
    import os
    import subprocess

    plain = {k: v for k, v in os.environ.items() if k not in ("PHILORA_HEAP", "LD_PRELOAD")}
    code = f"import os; {before}from philora import heap; print(heap.limit_slack())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=plain)
    assert done.stdout.strip() == str(set_), done.stderr
