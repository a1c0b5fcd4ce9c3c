"""One CLI grammar (#34): --base a base model, --adapter an adapter or run dir, --merged a merged model dir, on every
command; the old spellings warn and still work; errors name the flag as typed, before anything loads. One parity
line for merge and export, a usage after every export, eval reusing the run's base answers when they fit, the
report's "misses first" view and honest captions, and a one-line tools notice in serve."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import browse, tiny_config

from philora import cli, flags
from philora.errors import UserError
from philora.eval import base_answers, metrics, report
from philora.export import command, howto, merge, push, verify
from philora.paths import current_umask

WARNING = "philora: warning: {old} is deprecated here; use {new}\n"
# The one parity line (merge.parity_line), for merge and every export alike.
PARITY = re.compile(
    r"philora: (?P<what>.+) parity: max \|Δlogit\| \S+ \(\S+ of the logit scale(?:, tolerance (?P<tol>\S+))?\), "
    r"top-1 agreement [\d.]+%(?: \(floor \d+%\))? over \d+ positions: (?P<verdict>ok|FAILED)"
)


def parse(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[argparse.Namespace, str]:
    args = cli.parser().parse_args(argv)
    return args, capsys.readouterr().err


# --- the flags and their old spellings --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["eval", "chat", "serve", "merge"])
def test_base_is_the_base_and_model_is_its_deprecated_alias(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--output", "o"] if command == "merge" else []
    args, err = parse(capsys, command, "--base", "m", *extra)
    assert args.base == "m" and flags.typed(args, "base", "?") == "--base" and err == ""
    args, err = parse(capsys, command, "--model", "m", *extra)
    assert args.base == "m" and flags.typed(args, "base", "?") == "--model"
    assert err == WARNING.format(old="--model", new="--base")
    assert "--model" not in cli.parser().parse_args([command, *extra]).__dict__  # one dest: base


def test_data_check_takes_base_and_the_old_model(capsys: pytest.CaptureFixture[str]) -> None:
    args, err = parse(capsys, "data", "check", "f.jsonl", "--base", "m")
    assert args.model == "m" and err == ""  # dest model: run() makes it model.name_or_path
    args, err = parse(capsys, "data", "check", "f.jsonl", "--model", "m")
    assert args.model == "m" and err == WARNING.format(old="--model", new="--base")


def test_data_check_names_the_base_flag_typed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    for flag, warning in (("--base", ""), ("--model", WARNING.format(old="--model", new="--base"))):
        assert cli.main(["data", "check", str(data), flag, "./nowhere"]) == 2
        assert capsys.readouterr().err == f"{warning}philora: error: {flag} ./nowhere: no such directory\n"


@pytest.mark.parametrize(
    ("argv", "dest", "value", "warning"),
    [
        (["gguf", "--merged", "m"], "merged", "m", None),
        (["gguf", "--model", "m"], "merged", "m", ("--model", "--merged")),
        (["ollama", "--model", "m"], "merged", "m", ("--model", "--merged")),
        (["gguf-lora", "--base", "m"], "base", "m", None),
        (["gguf-lora", "--model", "m"], "base", "m", ("--model", "--base")),
        (["gguf-lora", "--base-gguf", "b.gguf"], "base_gguf", "b.gguf", None),
        (["gguf-lora", "--base", "b.gguf"], "base_gguf", "b.gguf", ("--base FILE.gguf", "--base-gguf FILE.gguf")),
    ],
)
def test_export_flags_and_their_old_spellings(
    argv: list[str], dest: str, value: str, warning: tuple[str, str] | None, capsys: pytest.CaptureFixture[str]
) -> None:
    args, _ = parse(capsys, "export", *argv, "--output", "x.gguf")
    command.old_spellings(args)
    assert getattr(args, dest) == value
    assert capsys.readouterr().err == (WARNING.format(old=warning[0], new=warning[1]) if warning else "")
    assert flags.typed(args, dest, "default") == argv[1]  # as typed, for its errors


def test_export_refuses_what_is_not_its_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["gguf", "--adapter", "a"], "export gguf: --adapter a: an adapter is exported by `philora export gguf-lora`"),
        (["ollama"], "export ollama: give --merged DIR, a merged model (philora merge --output)"),
        (["gguf", "--merged", "m", "--base", "b"], "export gguf: --merged and --base: give one model to convert"),
        (["gguf", "--model", "m", "--merged", "m"], "--model and --merged: the same model twice; give --merged alone"),
        (["gguf", "--merged", "m", "--base-gguf", "b.gguf"], "export gguf: --base-gguf is for gguf-lora"),
        (["gguf-lora", "--adapter", "a", "--merged", "m"], "export gguf-lora: --merged is for gguf and ollama"),
    ]
    for argv, message in cases:
        assert cli.main(["export", *argv, "--output", str(tmp_path / "x.gguf")]) == 2, argv
        assert message in capsys.readouterr().err, argv


def adapter_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


def merged_dir(path: Path, passed: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "merge.json").write_text(json.dumps({"passed": passed}))
    return path


def test_push_takes_adapter_or_merged_and_reads_the_old_dir_by_what_it_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, merged = adapter_dir(tmp_path / "run" / "adapter").parent, merged_dir(tmp_path / "merged")
    for argv, expected, warning in [
        (["--adapter", str(run)], (run, "--adapter", "adapter"), ""),
        (["--merged", str(merged)], (merged, "--merged", "merged"), ""),
        ([str(run)], (run, "DIR", "adapter"), WARNING.format(old="push DIR", new="push --adapter DIR")),
        ([str(merged)], (merged, "DIR", "merged"), WARNING.format(old="push DIR", new="push --merged DIR")),
    ]:
        args, _ = parse(capsys, "push", *argv, "--repo", "ana/x")
        assert push.what_to_push(args) == expected
        assert capsys.readouterr().err == warning
    both = cli.parser().parse_args(["push", "--adapter", str(run), "--merged", str(merged), "--repo", "ana/x"])
    with pytest.raises(UserError, match="push: --adapter and --merged: give one: --adapter DIR"):
        push.what_to_push(both)


def test_push_errors_name_the_flag_typed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter, merged = adapter_dir(tmp_path / "adapter"), merged_dir(tmp_path / "merged")
    failed, empty = merged_dir(tmp_path / "failed", passed=False), tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--adapter", str(tmp_path / "no")], f"--adapter {tmp_path / 'no'}: no such directory; give a run dir"),
        (["--merged", str(tmp_path / "no")], f"--merged {tmp_path / 'no'}: no such directory; give a `philora merge"),
        ([str(tmp_path / "no")], f"DIR {tmp_path / 'no'}: no such directory"),
        (["--merged", str(adapter)], f"--merged {adapter}: is an adapter, not a merged model; push it with --adapter"),
        (["--adapter", str(merged)], f"--adapter {merged}: is a merged model, not an adapter; push it with --merged"),
        (["--merged", str(failed)], f"--merged {failed}: merge.json records a merge that failed its parity check"),
        (["--adapter", str(empty)], f"--adapter {empty}: holds no adapter"),
    ]
    for argv, message in cases:
        assert cli.main(["push", *argv, "--repo", "ana/x", "--dry-run"]) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert errors == [f"philora: error: {message}"] or (len(errors) == 1 and message in errors[0]), errors


# --- path errors before anything loads ----------------------------------------------------------------------------


def test_missing_paths_are_named_as_typed_before_anything_loads(
    tiny_adapter: Path, tmp_path: Path, nothing_loads: None, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = str(tmp_path / "gone")
    data = tmp_path / "eval.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    adapter = str(tiny_adapter)
    lines = {
        "eval": ["eval", "--adapter", adapter, "--data", str(data), "--output", str(tmp_path / "e")],
        "chat": ["chat", "--adapter", adapter],
        "serve": ["serve", "--port", "0", "--adapter", adapter],
        "merge": ["merge", "--adapter", adapter, "--output", str(tmp_path / "m")],
        "gguf-lora": ["export", "gguf-lora", "--adapter", adapter, "--output", str(tmp_path / "a.gguf")],
    }
    for name, argv in lines.items():
        for flag in ("--base", "--model"):
            assert cli.main([*argv, flag, gone]) == 2, (name, flag)
            err = capsys.readouterr().err
            assert err.endswith(f"philora: error: {flag} {gone}: no such directory\n"), (name, err)
        for_adapter = [gone if a == adapter else a for a in argv]
        assert cli.main(for_adapter) == 2, name
        assert f"philora: error: --adapter {gone}: no such directory" in capsys.readouterr().err, name
    for fmt, out in (("gguf", "x.gguf"), ("ollama", "o")):
        for flag in ("--merged", "--base", "--model"):
            assert cli.main(["export", fmt, flag, gone, "--output", str(tmp_path / out)]) == 2
            err = capsys.readouterr().err
            assert f"philora: error: {flag} {gone}: no such directory; give " in err, (fmt, flag, err)
    base_gguf = ["export", "gguf-lora", "--adapter", adapter, "--output", str(tmp_path / "a.gguf")]
    for flag in ("--base-gguf", "--base"):
        assert cli.main([*base_gguf, flag, f"{gone}.gguf"]) == 2
        assert f"philora: error: {flag} {gone}.gguf: no such file" in capsys.readouterr().err


# --- one parity line ------------------------------------------------------------------------------------------------


def test_merge_and_export_print_their_parity_in_one_format() -> None:
    merged = {"max_abs_diff": 0.012, "logit_scale": 30.0, "relative": 4e-4, "tolerance": 5e-2,
              "top1_agreement": 1.0, "positions": 87}  # fmt: skip
    line = merge.parity_line("merge (bfloat16 weights read back vs base + adapter)", merged)
    assert line == (
        "philora: merge (bfloat16 weights read back vs base + adapter) parity: max |Δlogit| 0.012 (4.0e-04 of the "
        "logit scale, tolerance 0.05), top-1 agreement 100.0% over 87 positions: ok"
    )
    assert PARITY.fullmatch(merge.parity_line("merge", {**merged, "relative": 0.2}))["verdict"] == "FAILED"
    float_type = {**merged, "tolerance": 0.15, "top1_floor": None}
    quantized = {**merged, "relative": 0.3, "tolerance": None, "top1_floor": 0.7, "top1_agreement": 0.86}
    answers = [{"transformers": "a", "llama.cpp": "a", "finish": ["stop", "stop"]}] * 3
    for parity, verdict in ((float_type, "ok"), (quantized, "ok"), ({**quantized, "top1_agreement": 0.5}, "FAILED")):
        record = {"parity": parity, "answers": answers, "answers_identical": 3, "answers_stopped_alike": 2}
        first, second = verify.summary("GGUF q4_k_m", record).splitlines()
        match = PARITY.fullmatch(first)
        assert match and match["what"] == "GGUF q4_k_m in llama.cpp vs transformers" and match["verdict"] == verdict
        assert (match["tol"] is None) == (parity["tolerance"] is None)
        assert verdict == "ok" or verify.problems({**record, "tokenizer_identical": True})
        assert second == "philora: GGUF q4_k_m greedy answers: 3/3 identical to transformers', 2/3 stopped alike"


# --- usage after every export ---------------------------------------------------------------------------------------


def test_every_export_ends_with_how_to_use_it(tmp_path: Path) -> None:
    gguf, folder, lora = tmp_path / "model.gguf", tmp_path / "My Model", tmp_path / "a.gguf"
    text = howto.after_gguf(gguf)
    assert text.startswith(f"philora: to use {gguf}:\n")
    assert f"llama-cli -m {gguf} -cnv" in text and f"llama-server -m {gguf}" in text
    assert f'from llama_cpp import Llama; llm = Llama("{gguf}"' in text and "ollama create" in text
    text = howto.after_ollama(folder)
    assert f"cd '{folder}' && ollama create my-model -f Modelfile" in text and "ollama run my-model" in text
    text = howto.after_lora(lora, None, str(tmp_path))
    assert f"philora export gguf --base {tmp_path} --output base.gguf" in text
    assert f"llama-cli -m base.gguf --lora {lora} -cnv" in text and f'lora_path="{lora}"' in text
    assert f"ADAPTER {lora}" in text
    on_hub = howto.after_lora(lora, None, "owner/base")
    assert "hf download owner/base --local-dir base && philora export gguf --base base --output base.gguf" in on_hub
    own = howto.after_lora(lora, tmp_path / "q8.gguf", str(tmp_path))
    assert "philora export gguf" not in own and f"llama-cli -m {tmp_path / 'q8.gguf'} --lora {lora}" in own
    text = howto.after_merge(folder)
    quoted = f"'{folder}'"
    for line in (f"philora chat --base {quoted}", f"philora export gguf --merged {quoted} --output",
                 "from transformers import pipeline", f"philora export ollama --merged {quoted}"):  # fmt: skip
        assert line in text, line
    assert all(line.startswith("  ") and "  # " in line for line in text.splitlines()[1:])


# --- the base answers a run saved ----------------------------------------------------------------------------------


def answered(**changes: Any) -> base_answers.Answered:
    fields = {"model": "/m", "revision": None, "quantization": None, "start_adapter": None, "dtype": "float32",
              "autocast": "no", "device": "cpu", "prompts": "ab12", "count": 6, "max_new_tokens": 8,
              "batch_size": 4}  # fmt: skip
    return base_answers.Answered(**{**fields, **changes})


def test_saved_base_answers_are_reused_only_when_computed_alike(tmp_path: Path) -> None:
    path = tmp_path / "base-answers.json"
    base_answers.save(path, ["a", "b"], answered())
    assert base_answers.read(path) == ["a", "b"]
    assert base_answers.reusable(path, answered())[0] == ["a", "b"]
    for change, why in [
        ({"max_new_tokens": 16}, "max_new_tokens 16 here, 8 in the run"),
        ({"batch_size": 1}, "batch_size 1 here, 4 in the run"),
        ({"dtype": "bfloat16"}, "dtype bfloat16 here, float32 in the run"),
        ({"model": "/other"}, "base /other here, /m in the run"),
        ({"prompts": "cd34"}, "other prompts (other data, --limit, or another chat template)"),
        ({"prompts": "cd34", "count": 3}, "prompts 3 here, 6 in the run"),
    ]:
        saved, reason = base_answers.reusable(path, answered(**change))
        assert saved is None and reason.endswith(why), reason
    path.write_text('["a", "b"]\n')  # an older philora's: train still reads it, eval never reuses it
    assert base_answers.read(path) == ["a", "b"]
    assert base_answers.reusable(path, answered()) == (None, f"{path} does not record what they were computed with "
                                                       "(an older philora)")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_phi3: Path, tiny_data: tuple[Path, Path]) -> Path:
    """A 2-step tiny run that answers its 6 eval prompts before and after training."""
    tmp = tmp_path_factory.mktemp("grammar-run")
    config = tiny_config(tmp, tiny_phi3, tiny_data, max_steps=2, eval_steps=2, save_steps=100)
    assert cli.main(["train", "--config", str(config), "--output", str(tmp / "run")]) == 0
    return tmp / "run"


def test_eval_reuses_the_runs_base_answers_when_they_fit_and_says_why_not(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from philora.eval import runner

    asked: list[str] = []
    answer = runner.answer
    monkeypatch.setattr(runner, "answer", lambda *a, **k: asked.append(a[-1]) or answer(*a, **k))
    assert json.loads((tiny_run / "base-answers.json").read_text())["computed_with"]["max_new_tokens"] == 8
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(tiny_run)]) == 0
    err = capsys.readouterr().err
    assert f"philora: reusing the base model's answers: same model, prompts and decoding as {tiny_run}" in err
    assert asked == ["fine-tuned model"]
    ours, trained = (json.loads(p.read_text()) for p in (tiny_run / "eval" / "eval.json", tiny_run / "eval.json"))
    assert [s["before"] for s in ours["samples"]] == [s["before"] for s in trained["samples"]]
    assert ours["settings"]["base_answers"] == "reused from the run"
    mode = 0o666 & ~current_umask()  # what a plain open() gives: the user's umask, as every file of the run
    assert {p.stat().st_mode & 0o777 for p in (tiny_run / "eval").iterdir()} == {mode}
    asked.clear()
    assert cli.main(["eval", "--adapter", str(tiny_run), "--max-new-tokens", "4", "--output", str(tmp_path)]) == 0
    assert "philora: computing the base model's answers: the run's saved ones" in (err := capsys.readouterr().err)
    assert "max_new_tokens 4 here, 8 in the run" in err and asked == ["base model", "fine-tuned model"]
    # only into --output or the run's eval/: never over the run's own evaluation
    for out in (tiny_run, tiny_run / "adapter"):
        assert cli.main(["eval", "--adapter", str(tiny_run), "--output", str(out)]) == 2
        assert f"--output {out}: is the " in capsys.readouterr().err


def test_merge_prints_the_parity_line_and_how_to_use_the_model(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(tiny_run), "--output", str(out)]) == 0
    lines = capsys.readouterr().err.splitlines()
    match = next(m for line in lines if (m := PARITY.fullmatch(line)))
    assert match["what"] == "merge (float32 weights read back vs base + adapter)" and match["verdict"] == "ok"
    usage = lines[lines.index(f"philora: to use {out}:") :]
    assert any(f"philora chat --base {out}" in line for line in usage)
    assert any(f"philora export gguf --merged {out} --output model.gguf" in line for line in usage)
    args = cli.parser().parse_args(["push", str(out), "--repo", "ana/x"])
    assert push.what_to_push(args) == (out, "DIR", "merged")  # the old positional, read by what the dir holds


# --- report.html ------------------------------------------------------------------------------------------------------


def evaluation() -> dict[str, Any]:
    prompts = [([{"role": "user", "content": f"q{i}"}], f"a{i}", None) for i in (1, 2, 3)]
    result = metrics.compare(prompts, {"before": ["x", "y", "z"], "after": ["a1", "wrong", "a3"]})
    return {**result, "loss": {}, "settings": {"adapter": "out/adapter", "max_new_tokens": 8}}


def test_the_report_has_a_misses_first_toggle_and_captions_for_what_was_logged(tmp_path: Path) -> None:
    page = report.render(evaluation(), None, None)
    assert '<input type="checkbox" id="misses-first">' in page and 'data-miss="1"' in page
    assert "the 1 of 3 the fine-tuned model did not answer exactly" in page
    assert "Loss: cross-entropy" not in page and "Exact match after trimming whitespace" in page  # no loss rows
    train_only = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    caption = report.loss_caption(train_only)
    assert "eval loss at each evaluation" not in caption and "no eval loss" in caption
    assert "eval loss at each evaluation" in report.loss_caption([*train_only, {"step": 2, "eval_loss": 1.7}])
    assert report.loss_plot_alt(train_only) == "train loss"
    alone = {**evaluation(), "before": None}
    del alone["before"]
    for sample in alone["samples"]:
        del sample["before"]
    assert 'id="misses-first"' in report.render(alone, None, None)


def sample_order(page: Path, tmp: Path, fragment: str) -> list[str]:
    """The samples' ids in the order headless Chromium's DOM holds them, the page opened at `fragment`."""
    return re.findall(r'<article class="sample" id="(sample-\d+)"', browse(page, tmp, "--dump-dom", fragment=fragment))


def test_misses_first_sorts_the_samples_in_a_browser_offline(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(report.render(evaluation(), None, None))
    assert sample_order(page, tmp_path, "") == ["sample-1", "sample-2", "sample-3"]
    assert sample_order(page, tmp_path, "#misses-first") == ["sample-2", "sample-1", "sample-3"]


# --- serve ------------------------------------------------------------------------------------------------------------


def test_serve_says_the_tools_template_in_one_line(
    embedded_tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoTokenizer

    from philora.infer.serve import serving_encoder

    encoder = serving_encoder(AutoTokenizer.from_pretrained(embedded_tokenizer))
    assert encoder.tool_style == "native-hermes"  # tools work, as before
    assert capsys.readouterr().err.count("\n") == 1
