"""Config: presets load, the model card's dicts paste in, every mistake is reported at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import write_yaml

from philora import cli
from philora.config import PACKAGED_CONFIGS, dump_documented, load_config
from philora.config.fields import SECTIONS
from philora.errors import UserError

# The training_config / peft_config dicts of the Phi-3 model card's sample_finetune.py, pasted as YAML.
MODEL_CARD = """
training_config:
  bf16: true
  do_eval: false
  learning_rate: 5.0e-06
  log_level: info
  logging_steps: 20
  logging_strategy: steps
  lr_scheduler_type: cosine
  num_train_epochs: 1
  max_steps: -1
  output_dir: ./checkpoint_dir
  overwrite_output_dir: true
  per_device_eval_batch_size: 4
  per_device_train_batch_size: 4
  remove_unused_columns: true
  save_steps: 100
  save_total_limit: 1
  seed: 0
  gradient_checkpointing: true
  gradient_checkpointing_kwargs: {use_reentrant: false}
  gradient_accumulation_steps: 1
  warmup_ratio: 0.2
peft_config:
  r: 16
  lora_alpha: 32
  lora_dropout: 0.05
  bias: none
  task_type: CAUSAL_LM
  target_modules: all-linear
  modules_to_save: null
"""


@pytest.mark.parametrize("preset", sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
def test_every_preset_is_valid(preset: str) -> None:
    """Each preset loads, names the model its file name says, quantises exactly when it is a -qlora one, and packs
    rows that the model's context holds."""
    config = load_config(preset)
    model, data, tc = config.model, config.data, config.training_config
    if preset == "demo":
        assert model.name_or_path is None and model.quantization is None
        return
    if preset == "demo-dpo":  # continues the demo's SFT adapter on the shipped pairs
        assert (
            model.name_or_path is None and model.adapter == load_config("demo").training_config.output_dir + "/adapter"
        )
        assert tc.method == "dpo" and data.train is None
        return
    if preset == "demo-tools":  # the embedded model on the shipped tool-calling sample
        assert model.name_or_path is None and (data.train, data.eval) == ("sample:tools-train", "sample:tools-eval")
        return
    family, _, method = preset.rpartition("-")
    expected = {"phi3-mini-4k": ("microsoft/Phi-3-mini-4k-instruct", 4096),
                "phi3-mini-128k": ("microsoft/Phi-3-mini-128k-instruct", 131072),
                "phi3.5-mini": ("microsoft/Phi-3.5-mini-instruct", 131072),
                "phi4-mini": ("microsoft/Phi-4-mini-instruct", 131072)}  # fmt: skip
    name, context = expected[family]
    assert model.name_or_path == name and model.dtype == "auto"
    assert model.quantization == ("4bit" if method == "qlora" else None) and method in ("lora", "qlora")
    assert 1024 <= data.max_length <= context and data.packing
    assert config.peft_config.target_modules == "all-linear" and config.peft_config.r == 16
    assert tc.bf16 and tc.output_dir == f"out/{preset}"


def test_presets_cover_the_phi_family() -> None:
    names = {p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")}
    for model in ("phi3-mini-4k", "phi3-mini-128k", "phi3.5-mini", "phi4-mini"):
        assert {f"{model}-lora", f"{model}-qlora"} <= names


def test_model_card_dicts_paste_in(tmp_path: Path) -> None:
    config = load_config(str(write_yaml(tmp_path / "card.yaml", MODEL_CARD)))
    tc, pc = config.training_config, config.peft_config
    assert (tc.learning_rate, tc.warmup_ratio, tc.lr_scheduler_type, tc.bf16) == (5e-6, 0.2, "cosine", True)
    assert tc.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert (pc.r, pc.lora_alpha, pc.lora_dropout, pc.target_modules) == (16, 32, 0.05, "all-linear")


def test_defaults_when_sections_are_missing(tmp_path: Path) -> None:
    config = load_config(str(write_yaml(tmp_path / "empty.yaml", "")))
    assert config.model.name_or_path is None
    assert config.peft_config.target_modules == "all-linear"
    assert config.data.packing is True


def test_three_mistakes_three_lines_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_yaml(
        tmp_path / "bad.yaml",
        "model:\n  dtype: float64\npeft_config:\n  r: 0\ntraining_config:\n  learnin_rate: 0.001\n",
    )
    assert cli.main(["config", "--config", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3, lines
    assert f"{bad}:2: model.dtype: expected one of auto, bfloat16, float16, float32, got 'float64'" in lines[0]
    assert "training_config.learnin_rate: unknown key; did you mean learning_rate?" in lines[1]
    assert f"{bad}:6:" in lines[1]
    assert f"{bad}:4: peft_config.r: 0 is not allowed" in lines[2]
    assert "Traceback" not in "\n".join(lines)


def test_wrong_types_and_unknown_sections(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", "modle: {}\ndata:\n  packing: 'yes'\n  max_length: 1.5\n")
    with pytest.raises(UserError) as e:
        load_config(str(path))
    text = "\n".join(e.value.problems)
    assert "modle: unknown section; did you mean model?" in text
    assert "data.packing: expected true/false, got 'yes'" in text
    assert "data.max_length: expected an integer or null, got 1.5" in text  # null = auto, from the data
    assert len(e.value.problems) == 3


def test_options_philora_does_not_honour_are_named(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", "training_config:\n  deepspeed: ds.json\npeft_config:\n  loftq_config: {}\n")
    with pytest.raises(UserError) as e:
        load_config(str(path))
    assert all("philora does not honour this option yet" in p for p in e.value.problems)
    assert len(e.value.problems) == 2


def test_set_overrides(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "training_config.max_steps=3",
            "peft_config.target_modules=[qkv_proj,o_proj]",
            "training_config.learning_rate=5e-6",
            "data.train=x.jsonl",
            "data.eval=0.1",
        ],
    )
    assert config.training_config.max_steps == 3
    assert config.peft_config.target_modules == ["qkv_proj", "o_proj"]
    assert config.training_config.learning_rate == 5e-6
    assert config.data.train == "x.jsonl"


def test_bad_overrides_are_reported_with_the_rest() -> None:
    with pytest.raises(UserError) as e:
        load_config(None, ["max_steps=3", "training_config.max_steps=-5", "training_config.seed=abc"])
    problems = e.value.problems
    assert len(problems) == 3
    assert "--set max_steps=3: expected SECTION.KEY=VALUE" in problems[0]
    assert "--set: training_config.seed: expected an integer, got 'abc'" in problems
    assert any(p.startswith("--set: training_config.max_steps: -5 is not allowed") for p in problems)


def test_yaml_syntax_error_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_yaml(tmp_path / "c.yaml", "model:\n  dtype: [auto\n")
    assert cli.main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "invalid YAML" in err and f"{path}:" in err


def test_missing_config_file_lists_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--config", "nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert "--config nope.yaml: no such file" in err and "phi3-mini-4k-lora" in err


def test_documented_dump_has_a_comment_for_every_field() -> None:
    text = dump_documented(load_config())
    fields = [line for line in text.splitlines() if line.startswith("  ")]
    assert len(fields) == sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values())
    assert all("  # " in line for line in fields)


def test_max_row_bytes_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_yaml(tmp_path / "bad.yaml", "data:\n  max_length: 512\n  max_row_bytes: 0\n")
    assert cli.main(["config", "--config", str(bad)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"philora: error: {bad}:3: data.max_row_bytes: 0 is not allowed; use a positive number of bytes, or null for "
        "1 MiB or 256 × max_length, the larger"
    )
