"""The command line itself: bare `philora` and every `--help`, flag spellings, and errors that name what the user
typed (--base, an adapter's base) before anything slow loads; the pad-token notice said once."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from philora import cli


def test_bare_philora_prints_the_help_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: philora") and err == ""
    assert all(command in out for command in ("train", "check", "eval", "merge", "export", "chat", "serve"))


def every_parser(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each (sub)command's parser by its command line, the top one as ''."""
    found = {"": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= {f"{name} {k}".strip(): p for k, p in every_parser(sub).items()}
    return found


def test_every_help_shows_the_defaults_and_never_a_missing_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["serve", "--help"])
    assert done.value.code == 0
    serve = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: 8000)", "(default: 64)", "(default: 512)", "(default: 127.0.0.1)", "(default: 30)"):
        assert default in serve
    for command, parser in every_parser(cli.parser()).items():
        text = " ".join(parser.format_help().split())
        assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
        for action in parser._actions:  # every real default is shown, unless the help says it already
            if action.default not in (None, False, [], argparse.SUPPRESS):
                assert action.help, (command, action.dest)
                assert "default" in action.help or f"(default: {action.default})" in text, (command, action.dest)
    chat = " ".join(every_parser(cli.parser())["chat"].format_help().split())
    assert "0 = greedy (default)" in chat and "(default: 0.0)" not in chat  # said in the help already: not twice


@pytest.mark.parametrize("spelling", ["q4_K_M", "Q8_0", "BF16"])
def test_gguf_types_are_case_insensitive(spelling: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for fmt in ("gguf", "ollama"):
        args = cli.parser().parse_args(["export", fmt, "--merged", "m", "--output", "o", "--type", spelling])
        assert args.type == spelling.lower() and args.type in cli.GGUF_TYPES
    missing = tmp_path / "missing"
    assert cli.main(["export", "gguf", "--merged", str(missing), "--output", "x.gguf", "--type", spelling]) == 2
    assert capsys.readouterr().err == (
        f"philora: error: --merged {missing}: no such directory; give a merged model dir (philora merge --output)\n"
    )
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["export", "gguf", "--merged", "m", "--output", "o", "--type", "q3_k_m"])
    assert "invalid choice: 'q3_k_m'" in capsys.readouterr().err


# --- errors name the flag typed, before anything loads ----------------------------------------------------------


@pytest.fixture
def adapter(tiny_adapter: Path) -> Path:
    """An adapter from elsewhere (no run.json): adapter_config.json names tiny_phi3 as its base."""
    return tiny_adapter


def command_lines(adapter: Path, out: Path) -> dict[str, list[str]]:
    data = out / "eval.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    return {
        "eval": ["eval", "--adapter", str(adapter), "--data", str(data), "--output", str(out / "eval")],
        "chat": ["chat"],
        "serve": ["serve", "--port", "0"],
        "merge": ["merge", "--adapter", str(adapter), "--output", str(out / "merged")],
        "gguf-lora": ["export", "gguf-lora", "--adapter", str(adapter), "--output", str(out / "a.gguf")],
    }


@pytest.mark.parametrize("command", ["eval", "chat", "serve", "merge", "gguf-lora"])
def test_a_bad_model_path_names_the_flag_before_anything_loads(
    command: str, adapter: Path, tmp_path: Path, nothing_loads: None, capsys: pytest.CaptureFixture[str]
) -> None:
    file, bare = tmp_path / "weights.bin", tmp_path / "empty"
    file.write_text("x")
    bare.mkdir()
    for model, problem in [
        ("./nowhere", ": no such directory"),
        (str(file), " is a file; give the model's directory"),
        (str(bare), " has no config.json; is it a Hugging Face model directory?"),
    ]:
        assert cli.main([*command_lines(adapter, tmp_path)[command], "--base", model]) == 2
        assert capsys.readouterr().err == f"philora: error: --base {model}{problem}\n", (command, model)


def test_a_missing_base_is_named_as_the_adapters(
    adapter: Path, tmp_path: Path, nothing_loads: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import shutil

    moved = shutil.copytree(adapter, tmp_path / "adapter")
    config = json.loads((moved / "adapter_config.json").read_text())
    gone = str(tmp_path / "moved-away")
    (moved / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": gone}))
    assert cli.main(["chat", "--adapter", str(moved)]) == 2
    assert capsys.readouterr().err == f"philora: error: --adapter {moved}: its base {gone}: no such directory\n"


# --- the pad-token notice -----------------------------------------------------------------------------------------


def test_the_pad_notice_is_said_once_per_process_and_not_before_a_bad_data_file(
    adapter: Path, tiny_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from philora.model import load

    load.notice.cache_clear()  # a fresh process
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    common = ["eval", "--adapter", str(adapter), "--no-base", "--limit", "1", "--max-new-tokens", "2"]
    assert cli.main([*common, "--data", str(bad), "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "pad token" not in err and err.count("philora: error:") == 2, err
    assert cli.main([*common, "--data", str(tiny_data[1]), "--output", str(tmp_path / "one")]) == 0
    assert capsys.readouterr().err.count("pad token '<|im_end|>' is the end-of-sequence token") == 1
    assert cli.main([*common, "--data", str(tiny_data[1]), "--output", str(tmp_path / "two")]) == 0
    assert "pad token" not in capsys.readouterr().err  # said once per process
