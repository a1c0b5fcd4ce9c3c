"""A model's own Python code runs only when the command that loads it says --trust-remote-code: a copied run dir
whose run.json trusted its base, or a config file saying trust_remote_code: true, runs nothing on its own.

The base here is the tiny Phi-3 under a model type transformers does not know, whose config.json points (auto_map)
at a module of its own; importing that module writes a marker file, so "did its code run?" is a file's existence.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from philora import cli
from philora.errors import UserError
from philora.infer.adapters import read_adapter

MODULE = """import pathlib

from transformers import Phi3Config, Phi3ForCausalLM

pathlib.Path({marker!r}).write_text("ran")  # the code a user never agreed to run


class TrustTestConfig(Phi3Config):
    model_type = "philora_trust_test"


class TrustTestForCausalLM(Phi3ForCausalLM):
    config_class = TrustTestConfig
"""


@pytest.fixture
def base(tiny_phi3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tiny_phi3's weights and tokenizer under a model type that only its own module defines."""
    import transformers.dynamic_module_utils as dynamic

    # transformers copies trusted code into its modules cache (on sys.path): keep both inside this test
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    path = shutil.copytree(tiny_phi3, tmp_path / "own-code-base")
    (path / "trusttest.py").write_text(MODULE.format(marker=str(tmp_path / "code-ran")))
    config = json.loads((path / "config.json").read_text())
    config |= {
        "model_type": "philora_trust_test",
        "architectures": ["TrustTestForCausalLM"],
        "auto_map": {
            "AutoConfig": "trusttest.TrustTestConfig",
            "AutoModelForCausalLM": "trusttest.TrustTestForCausalLM",
        },
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def code_ran(base: Path) -> bool:
    return (base.parent / "code-ran").exists()


@pytest.fixture
def adapter(tiny_adapter: Path) -> Path:
    """A LoRA adapter of tiny_phi3 (the same weights as `base`), in peft's format."""
    return tiny_adapter


def run_dir(adapter: Path, base: Path, **model: object) -> Path:
    """A run dir as `philora train` leaves it (adapter/ and run.json), its run having trusted `base`'s code."""
    root = base.parent / "run"
    shutil.copytree(adapter, root / "adapter")
    section = {"name_or_path": str(base), "dtype": "float32", "trust_remote_code": True, **model}
    config = {"model": section, "data": {}, "peft_config": {}, "training_config": {}}
    (root / "run.json").write_text(json.dumps({"config": config, "model_dtype": "float32"}))
    return root


def command_lines(run: Path, eval_file: Path) -> dict[str, list[str]]:
    out = run.parent
    return {
        "serve": ["serve", "--adapter", str(run), "--port", "0"],
        "chat": ["chat", "--adapter", str(run)],
        "eval": ["eval", "--adapter", str(run), "--data", str(eval_file), "--no-base"],
        "merge": ["merge", "--adapter", str(run), "--output", str(out / "merged")],
        "export gguf-lora": ["export", "gguf-lora", "--adapter", str(run), "--output", str(out / "lora.gguf")],
    }


@pytest.mark.parametrize("command", ["serve", "chat", "eval", "merge", "export gguf-lora"])
def test_a_run_dir_that_trusted_its_base_runs_no_code_without_the_flag(
    command: str,
    base: Path,
    adapter: Path,
    tiny_data: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import philora.infer.serve

    # Were the model to load, serve would answer requests until stopped: stop it there instead of hanging.
    monkeypatch.setattr(philora.infer.serve, "serve", lambda *args: 0, raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    run = run_dir(adapter, base)
    assert cli.main(command_lines(run, tiny_data[1])[command]) == 2
    assert not code_ran(base)
    err = capsys.readouterr().err
    problem = [line for line in err.splitlines() if line.startswith("philora: error:")]
    assert problem == [
        f"philora: error: --adapter {run / 'adapter'}: its base {base} needs its own Python code to load (auto_map "
        f"in its config); the run that made {run} trusted its base's code; pass --trust-remote-code if you do too"
    ]
    assert "Traceback" not in err and not (run.parent / "merged").exists() and not (run.parent / "lora.gguf").exists()


def test_the_flag_lets_the_base_run_its_code_and_a_merge_keeps_needing_it(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, merged = run_dir(adapter, base), tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(run), "--output", str(merged), "--trust-remote-code"]) == 0
    assert code_ran(base) and (merged / "trusttest.py").is_file()  # the merged model carries its base's code
    (tmp_path / "code-ran").unlink()
    capsys.readouterr()
    assert cli.main(["export", "gguf", "--merged", str(merged), "--output", str(tmp_path / "merged.gguf")]) == 2
    assert capsys.readouterr().err == (
        f"philora: error: --merged {merged} needs its own Python code to load (auto_map in its config); pass "
        "--trust-remote-code if you trust it\n"
    )
    assert not code_ran(base) and not (tmp_path / "merged.gguf").exists()


def test_a_run_json_records_trust_but_never_grants_it(base: Path, adapter: Path) -> None:
    loaded = read_adapter(run_dir(adapter, base))
    assert loaded.trusted_code and loaded.model.trust_remote_code is False
    assert loaded.model.name_or_path == str(base)


def test_a_run_json_cannot_name_an_attention_kernel_from_the_hub(base: Path, adapter: Path) -> None:
    run = run_dir(adapter, base, attn_implementation="kernels-community/flash-attn")
    with pytest.raises(UserError, match=r"model\.attn_implementation: expected one of eager, sdpa, flash_attention_2"):
        read_adapter(run)


@pytest.mark.parametrize("command", [["train"], ["check"], ["data", "check", "FILE"]])
def test_a_config_that_trusts_its_model_is_refused_without_the_flag(
    command: list[str], base: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = base.parent / "cfg.yaml"
    config.write_text(f"model:\n  name_or_path: {base}\n  trust_remote_code: true\n")
    command = [str(tiny_data[0]) if word == "FILE" else word for word in command]
    assert cli.main([*command, "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"philora: error: model.trust_remote_code: true in {config}:3 runs the model's own code; pass "
        "--trust-remote-code to allow it\n"
    )
    # --set is on the command line, but the flag is the one way to say it
    assert cli.main([*command, "--set", f"model.name_or_path={base}", "--set", "model.trust_remote_code=true"]) == 2
    assert "--set model.trust_remote_code=true runs the model's own code; pass --trust-remote-code" in (
        capsys.readouterr().err
    )
    assert not code_ran(base)


def test_a_model_that_needs_its_code_names_the_flag(
    base: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from philora.config import ModelSection
    from philora.model.load import load_model

    with pytest.raises(UserError) as refused:
        load_model(ModelSection(name_or_path=str(base)), training=False)
    assert refused.value.problems == [
        f"model.name_or_path: {base} needs its own Python code to load (auto_map in its config); pass "
        "--trust-remote-code if you trust it"
    ]
    run = run_dir(adapter, base, trust_remote_code=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli.main(["chat", "--adapter", str(run)]) == 2
    assert capsys.readouterr().err.endswith(
        f"philora: error: --adapter {run / 'adapter'}: its base {base} needs its own Python code to load (auto_map "
        "in its config); pass --trust-remote-code if you trust it\n"
    )
    assert not code_ran(base)
