"""`philora eval` and the eval files: scores against known values, the same numbers as the training run, base
beside fine-tuned, clean exit-2 errors, and report.html rendered in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import browse, read_jsonl, tiny_config

from philora import cli
from philora.eval import metrics, report, table

HOSTILE = '</pre><script>document.title="pwned"</script><img src=x onerror="document.title=\'pwned\'"> & "q"'


# --- scoring ---------------------------------------------------------------------------------------------------


def test_exact_match_rouge_l_and_json_scores() -> None:
    from rouge_score import rouge_scorer

    refs = ['{"name": "Ann Lee", "city": null}', '{"a": 1, "b": [2, 3]}', '{"x": "y"}', '{"k": 1}']
    preds = [
        '  {"name": "Ann Lee", "city": null}\n',  # exact after trimming
        '{"b": [2, 3], "a": 1}',  # the same JSON, other key order: not exact, but a JSON match
        '{"x": "z"}',  # valid JSON, wrong value
        "not json at all",
    ]
    result = metrics.score(preds, refs)
    assert result["exact_match"] == 0.25
    assert result["json_valid"] == 0.75 and result["json_match"] == 0.5
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    library = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)]
    assert result["rouge_l"] == pytest.approx(sum(library) / 4)
    # by hand: tokens are lower-cased ASCII words; LCS "the cat on mat" = 4 of 6 each way; "name ann" of "name ann lee"
    assert metrics.rouge_l(["the cat lay on a mat"], ["The cat sat on the mat"]) == pytest.approx(2 / 3)
    assert metrics.rouge_l(['{"name": "Ann"}'], ['{"name": "Ann Lee"}']) == pytest.approx(0.8)
    assert metrics.rouge_l(["Hello there"], ["hello  THERE"]) == 1.0
    # JSON metrics only when every reference is a JSON object or array
    assert set(metrics.score(["a", "{}"], ["plain text", "{}"])) == {"exact_match", "rouge_l"}
    assert set(metrics.score(["42"], ["42"])) == {"exact_match", "rouge_l"}


def synthetic_evaluation(base: bool = True) -> dict:
    prompts = [
        (
            [{"role": "system", "content": "Return JSON."}, {"role": "user", "content": "Ann Lee"}],
            '{"name": "Ann Lee"}',
            None,
        ),
        ([{"role": "user", "content": HOSTILE}], HOSTILE, None),
    ]
    generations = {"before": ["Sure! Ann", "no"]} if base else {}
    generations["after"] = ['{"name": "Ann Lee"}', HOSTILE + " ```"]
    evaluation = metrics.compare(prompts, generations)
    evaluation["loss"] = {"after": metrics.loss_metrics(0.5)}
    if base:
        evaluation["loss"]["before"] = metrics.loss_metrics(2.25)
    evaluation["settings"] = {"adapter": "out/adapter", "data": "eval.jsonl", "max_new_tokens": 8, "loss_samples": 2}
    return evaluation


def test_metric_table_for_terminal_and_markdown() -> None:
    evaluation = synthetic_evaluation()
    text = table.format_comparison(evaluation)
    cells = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()[1:6]]
    assert cells[0] == ["metric", "base", "fine-tuned", "Δ"]
    rows = {row[0]: row[1:] for row in cells[1:]}
    assert rows["eval loss"] == ["2.2500", "0.5000", "-1.7500"]
    assert rows["perplexity"] == ["9.49", "1.65", "-7.84"]  # e^2.25, e^0.5
    assert rows["exact match"] == ["0.0%", "50.0%", "+50.0 pts"]
    # no JSON rows: one reference is not JSON
    assert list(rows) == ["eval loss", "perplexity", "exact match", "ROUGE-L F1"]
    assert text.splitlines()[6] == "  example prompt: 'Ann Lee'"
    assert "example prompt: 'Ann Lee'" in text and 'fine-tuned: \'{"name": "Ann Lee"}\'' in text

    md = report.markdown(evaluation)
    assert "| metric | base | fine-tuned | Δ |" in md and "| exact match | 0.0% | 50.0% | +50.0 pts |" in md
    assert "````text\n" + HOSTILE + " ```\n````" in md  # a fence longer than any backtick run inside

    alone = table.format_comparison(synthetic_evaluation(base=False))
    cells = [re.split(r"\s{2,}", line.strip()) for line in alone.splitlines()[1:4]]
    assert cells == [["metric", "fine-tuned"], ["eval loss", "0.5000"], ["perplexity", "1.65"]]


# --- end to end on a tiny model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_phi3: Path, tiny_data: tuple[Path, Path]) -> Path:
    """A 6-step tiny run that evaluates loss at steps 3 and 6 and generates before/after answers."""
    tmp = tmp_path_factory.mktemp("eval-run")
    out = tmp / "run"
    assert cli.main(["train", "--config", str(tiny_config(tmp, tiny_phi3, tiny_data)), "--output", str(out)]) == 0
    return out


def eval_args(run_dir: Path, *extra: str) -> list[str]:
    # the run's own per_device_eval_batch_size (default 4) and generation_max_length, as train used
    return ["eval", "--adapter", str(run_dir / "adapter"), "--batch-size", "4", "--max-new-tokens", "8", *extra]


def test_train_writes_eval_files_through_the_shared_code(run_dir: Path) -> None:
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert {"prompts", "before", "after", "loss", "samples", "settings", "versions"} <= evaluation.keys()
    assert evaluation["prompts"] == 6 and {"exact_match", "rouge_l"} <= evaluation["after"].keys()
    final_eval = [r["eval_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_loss" in r][-1]
    assert evaluation["loss"]["after"]["eval_loss"] == pytest.approx(final_eval, rel=1e-5)
    assert evaluation["loss"]["before"]["eval_loss"] > evaluation["loss"]["after"]["eval_loss"] + 0.1
    run = json.loads((run_dir / "run.json").read_text())
    assert run["generation_eval"]["loss"] == evaluation["loss"] and "samples" not in run["generation_eval"]
    assert "| exact match |" in (run_dir / "eval.md").read_text()
    assert 'id="loss-curve"' in (run_dir / "report.html").read_text()


def test_eval_reproduces_the_runs_numbers_base_beside_tuned(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(eval_args(run_dir)) == 0
    err = capsys.readouterr().err
    out = run_dir / "eval"
    assert {p.name for p in out.iterdir()} == {"eval.json", "eval.md", "report.html"}
    ours, trained = (json.loads(p.read_text()) for p in (out / "eval.json", run_dir / "eval.json"))
    # the same rows, masks and weights: the loss the run logged last, and the run's base and tuned answers
    final_eval = json.loads((run_dir / "run.json").read_text())["final_eval_loss"]
    assert ours["loss"]["after"]["eval_loss"] == pytest.approx(final_eval, rel=1e-6)
    assert ours["loss"]["before"]["eval_loss"] == pytest.approx(trained["loss"]["before"]["eval_loss"], rel=1e-6)
    assert ours["loss"]["after"]["perplexity"] == pytest.approx(2.718281828 ** ours["loss"]["after"]["eval_loss"])
    assert [(s["before"], s["after"]) for s in ours["samples"]] == [
        (s["before"], s["after"]) for s in trained["samples"]
    ]
    assert ours["before"] == trained["before"] and ours["after"] == trained["after"]
    assert ours["settings"]["conversations"] == 6 and ours["settings"]["batch_size"] == 4
    assert ours["versions"]["rouge-score"] and ours["versions"]["peft"]
    row = next(line for line in err.splitlines() if line.strip().startswith("eval loss"))
    assert row.split()[2:4] == [f"{ours['loss']['before']['eval_loss']:.4f}", f"{final_eval:.4f}"]
    assert f"wrote eval.json, eval.md and report.html to {out}" in err


def test_eval_reproduces_a_bf16_run_in_the_dtype_it_trained_in(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A run in bf16 weights (what `dtype: auto` gives on GPUs and AMX CPUs) is evaluated in bf16 on any machine:
    the same eval loss to 1e-6 (same data, batches and dtype; what remains is the order of a float sum) and the
    same answers. --dtype float32 is honoured, and says so by not saying it follows the run."""
    out = tmp_path / "run"
    config = tiny_config(tmp_path, tiny_phi3, tiny_data, max_steps=3, eval_steps=3, save_steps=100)
    assert cli.main(["train", "--config", str(config), "--output", str(out), "--set", "model.dtype=bfloat16"]) == 0
    assert json.loads((out / "run.json").read_text())["model_dtype"] == "bfloat16"
    capsys.readouterr()
    assert cli.main(eval_args(out)) == 0
    assert "loading the weights in bfloat16, as the run trained" in capsys.readouterr().err
    ours, trained = (json.loads(p.read_text()) for p in (out / "eval" / "eval.json", out / "eval.json"))
    assert ours["settings"]["dtype"] == "bfloat16"
    for model in ("before", "after"):
        assert ours["loss"][model]["eval_loss"] == pytest.approx(trained["loss"][model]["eval_loss"], rel=1e-6)
    assert [(s["before"], s["after"]) for s in ours["samples"]] == [
        (s["before"], s["after"]) for s in trained["samples"]
    ]
    assert cli.main([*eval_args(out), "--dtype", "float32", "--output", str(tmp_path / "fp32")]) == 0
    assert "as the run trained" not in capsys.readouterr().err
    assert json.loads((tmp_path / "fp32" / "eval.json").read_text())["settings"]["dtype"] == "float32"


def test_no_base_limit_and_data(run_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "only-tuned"
    assert (
        cli.main(eval_args(run_dir, "--data", str(tiny_data[0]), "--limit", "3", "--no-base", "--output", str(out)))
        == 0
    )
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["prompts"] == 3 and evaluation["settings"]["data"] == str(tiny_data[0])
    assert "before" not in evaluation and list(evaluation["loss"]) == ["after"]
    assert all(set(s) == {"prompt", "reference", "after"} for s in evaluation["samples"])
    first_three = [json.loads(line)["messages"][-1]["content"] for line in tiny_data[0].read_text().splitlines()[:3]]
    assert [s["reference"] for s in evaluation["samples"]] == first_three


def test_user_mistakes_exit_2_with_one_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    cases = [
        (["eval", "--adapter", str(tmp_path / "nowhere")], f"--adapter {tmp_path / 'nowhere'}: no such directory"),
        (["eval"], "--adapter: required"),
        (
            eval_args(run_dir, "--data", str(tmp_path / "missing.jsonl")),
            f"--data {tmp_path / 'missing.jsonl'}: no such",
        ),
        (eval_args(run_dir, "--data", str(bad)), f"--data {bad}: 2 bad rows in all; fix them"),
        (eval_args(run_dir, "--limit", "0"), "--limit 0: must be at least 1"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert all(line.startswith("philora: error: ") for line in err.strip().splitlines() if "error" in line)


def test_adapter_from_elsewhere_needs_data_and_says_it_has_no_log(
    run_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = shutil.copytree(run_dir / "adapter", tmp_path / "my-adapter")  # no run.json beside it
    assert cli.main(["eval", "--adapter", str(adapter), "--max-new-tokens", "4"]) == 2
    assert "no run.json beside it to name its eval data; pass --data FILE" in capsys.readouterr().err
    assert cli.main(["eval", "--adapter", str(adapter), "--data", str(tiny_data[1]), "--max-new-tokens", "4"]) == 0
    page = (tmp_path / "my-adapter-eval" / "report.html").read_text()
    assert 'id="no-loss-curve"' in page and 'id="no-run"' in page and "<img" not in page


# --- report.html in a real browser -------------------------------------------------------------------------------


class Dom(HTMLParser):
    """The parts of a DOM dump the test reads: metric cells, images, the title, the text of answer blocks."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], str] = {}
        self.images: list[dict[str, str]] = []
        self.scripts = 0
        self.title = ""
        self.texts: list[str] = []
        self._metric = self._cell = None
        self._in: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self._in.append(tag)
        if tag == "tr":
            self._metric = a.get("data-metric")
        elif tag == "td" and self._metric and "data-model" in a:
            self._cell = (self._metric, a["data-model"])
            self.cells[self._cell] = ""
        elif tag == "img":
            self.images.append(a)
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        if self._in and self._in[-1] == tag:
            self._in.pop()

    def handle_data(self, data: str) -> None:
        if self._cell:
            self.cells[self._cell] += data
        if self._in and self._in[-1] == "title":
            self.title += data
        if self._in and self._in[-1] == "pre":
            self.texts.append(data)


def test_report_renders_in_chromium_with_its_numbers_plot_and_escaped_text(
    run_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path
) -> None:
    hostile = tmp_path / "hostile.jsonl"
    rows = [json.loads(line) for line in tiny_data[1].read_text().splitlines()[:2]]
    rows[1]["messages"][-1]["content"] = HOSTILE  # a reference that tries to break out of its <pre>
    hostile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    assert cli.main(eval_args(run_dir, "--data", str(hostile), "--output", str(out))) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    page = out / "report.html"
    text = page.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:|//)|url\(""", text), "external reference"

    dom = Dom(browse(page, tmp_path, "--dump-dom"))
    assert dom.title.startswith("philora eval: run") and dom.scripts == 1
    for key, value, kind in (
        ("eval_loss", evaluation["loss"]["after"]["eval_loss"], "loss"),
        ("perplexity", evaluation["loss"]["before"]["perplexity"], "ppl"),
        ("exact_match", evaluation["after"]["exact_match"], "score"),
        ("rouge_l", evaluation["before"]["rouge_l"], "score"),
    ):
        model = "after" if key in ("eval_loss", "exact_match") else "before"
        assert dom.cells[(key, model)] == table.format_value(kind, value), key
    delta = evaluation["loss"]["after"]["eval_loss"] - evaluation["loss"]["before"]["eval_loss"]
    assert dom.cells[("eval_loss", "delta")] == f"{delta:+.4f}"
    # the inline PNG decoded to the size its header declares (the script writes naturalWidth once it has loaded)
    [plot] = dom.images
    png = base64.b64decode(plot["src"].split(",", 1)[1])
    width, _ = struct.unpack(">II", png[16:24])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and plot["data-natural-width"] == str(width) and width > 300
    # the hostile reference is text on the page, not markup: no second image, no script ran
    assert HOSTILE in dom.texts

    shot = tmp_path / "shot.png"
    browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars")
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1600)
    # the eval-loss line of the plot is orange (#d9822b), a colour nothing else on the page uses
    orange = sum(1 for r, g, b in image.getdata() if abs(r - 0xD9) < 30 and abs(g - 0x82) < 30 and abs(b - 0x2B) < 30)
    assert orange > 50, "the loss plot is not visible in the screenshot"
