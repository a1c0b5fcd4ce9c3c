"""The readable forms of an evaluation: eval.md (a Markdown table and samples) and report.html, one self-contained
page with no external URL (inline CSS, the loss curve as an inline PNG) that opens anywhere, offline, and can be
mailed or attached to a pull request as one file. Every piece of model or data text is HTML-escaped; a Content
Security Policy forbids any fetch and every script but the one below, so the page stays inert whatever the
answers hold."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from philora.errors import UserError
from philora.eval.table import RUNS, format_delta, format_value, metric_rows, present_runs
from philora.rundir import EVAL_FILES, RunDir, plot_losses, read_records, score_names

HTML_SAMPLES = 100  # samples shown in report.html; eval.json has them all
MD_SAMPLES = 5

# Records on each image the size it decoded to: a visible sign that the inline PNG is intact (tests read it).
# The "misses first" box puts the samples the fine-tuned model did not answer exactly first (a stable sort on
# data-miss, then the original order); #misses-first in the address turns it on, so the view can be linked.
SCRIPT = (
    "for (const img of document.images) {"
    " const mark = () => { img.dataset.naturalWidth = img.naturalWidth; };"
    " if (img.complete) mark(); else { img.addEventListener('load', mark); img.addEventListener('error', mark); } }"
    "\nconst box = document.getElementById('misses-first'), list = document.getElementById('samples');"
    "\nif (box && list) {"
    " const order = (misses) => {"
    " const rows = Array.from(list.querySelectorAll('article.sample'));"
    " rows.sort((a, b) => (misses ? b.dataset.miss - a.dataset.miss : 0) || a.dataset.index - b.dataset.index);"
    " for (const row of rows) list.appendChild(row); };"
    " box.addEventListener('change', () => { order(box.checked);"
    " try { history.replaceState(null, '', box.checked ? '#misses-first' : location.pathname); } catch (e) {} });"
    " if (location.hash === '#misses-first') { box.checked = true; order(true); } }"
)

CSS = """
:root { color-scheme: light dark; --fg: #1d2430; --muted: #5f6b7a; --bg: #fff; --line: #d8dee6; --soft: #f4f6f9;
  --good: #1a7f37; --bad: #c0392b; --accent: #2f6db5; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e9ee; --muted: #9aa5b1; --bg: #14181d; --line: #2e353e;
  --soft: #1c2128; --good: #3fb950; --bad: #f85149; --accent: #6ea8e8; } }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1200px; padding: 24px; font: 15px/1.5 system-ui, sans-serif; color: var(--fg);
  background: var(--bg); }
h1 { font-size: 1.5em; margin: 0 0 4px; } h2 { font-size: 1.15em; margin: 32px 0 8px; }
.meta, .note { color: var(--muted); } .note { font-style: italic; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 5px 12px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
#metrics td.num, #metrics th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.better { color: var(--good); font-weight: 600; } td.worse { color: var(--bad); font-weight: 600; }
#run th { font-weight: 500; color: var(--muted); white-space: nowrap; }
img { max-width: 100%; height: auto; border: 1px solid var(--line); background: #fff; }
.sample { border: 1px solid var(--line); border-radius: 6px; margin: 12px 0; padding: 10px 12px; }
.sample h3 { font-size: 1em; margin: 0 0 6px; }
.answers { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 8px; }
.answers > div { background: var(--soft); border-radius: 4px; padding: 6px 8px; min-width: 0; }
.label { font-size: 0.8em; text-transform: uppercase; letter-spacing: 0.04em; color: var(--muted); }
pre { margin: 2px 0 0; white-space: pre-wrap; word-break: break-word; font: 13px/1.45 ui-monospace, monospace; }
.badge { font-size: 0.8em; padding: 0 6px; border-radius: 8px; margin-left: 6px; border: 1px solid currentColor; }
.hit { color: var(--good); } .miss { color: var(--bad); }
#view label { cursor: pointer; }
details { margin: 4px 0; } summary { cursor: pointer; color: var(--muted); }
footer { margin-top: 32px; font-size: 0.85em; color: var(--muted); }
"""


def read_run(run_dir: Path | None) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """run.json and the metrics.jsonl records of a run dir; None for what is not there."""
    if run_dir is None:
        return None, None
    files = RunDir(run_dir)
    run = json.loads(files.record.read_text()) if files.record.is_file() else None
    records = read_records(files.metrics) if files.metrics.is_file() else None
    return run, records


def loss_plot_png(records: list[dict[str, Any]]) -> bytes:
    """The run's loss curve (train loss per logged step, eval loss per evaluation) as PNG bytes: the same figure
    as the run's loss.png, drawn again from metrics.jsonl."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "loss.png"
        plot_losses(records, path)
        return path.read_bytes()


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _tone(kind: str, delta: float | None) -> str:
    """'better' or 'worse' for a difference of after - before; losses improve downwards, scores upwards."""
    if not delta:
        return ""
    return "better" if (delta < 0) == (kind != "score") else "worse"


def metrics_table(evaluation: dict[str, Any]) -> str:
    runs = present_runs(evaluation)
    both = len(runs) == 2
    head = "".join(f'<th class="num">{_e(RUNS[r])}</th>' for r in runs) + ('<th class="num">Δ</th>' if both else "")
    rows = []
    for row in metric_rows(evaluation):
        cells = "".join(f'<td class="num" data-model="{r}">{_e(format_value(row["kind"], row[r]))}</td>' for r in runs)
        if both:
            tone = _tone(row["kind"], row["delta"])
            cells += f'<td class="num {tone}" data-model="delta">{_e(format_delta(row["kind"], row["delta"]))}</td>'
        rows.append(f'<tr data-metric="{row["key"]}"><th>{_e(row["label"])}</th>{cells}</tr>')
    return f'<table id="metrics"><thead><tr><th>metric</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def loss_section(records: list[dict[str, Any]] | None) -> str:
    if records is None:
        return (
            '<p class="note" id="no-loss-curve">No training log (metrics.jsonl) next to this adapter, '
            "so there is no loss curve to show.</p>"
        )
    if not any("loss" in r or "eval_loss" in r for r in records):
        return '<p class="note" id="no-loss-curve">The run logged no losses (training_config.logging_strategy).</p>'
    data = base64.b64encode(loss_plot_png(records)).decode()
    return (
        f'<figure><img id="loss-curve" alt="{loss_plot_alt(records)} per optimizer step" '
        f'src="data:image/png;base64,{data}"><figcaption class="meta">{loss_caption(records)}</figcaption></figure>'
    )


def loss_plot_alt(records: list[dict[str, Any]]) -> str:
    train, evals = any("loss" in r for r in records), any("eval_loss" in r for r in records)
    scores = bool(score_names(records))
    return " and ".join(name for name, logged in (("train loss", train), ("eval loss", evals),
                                                  ("held-out scores", scores)) if logged)  # fmt: skip


def loss_caption(records: list[dict[str, Any]]) -> str:
    """What the plot shows, as the run logged it: an eval loss is mentioned only where one was logged."""
    parts = []
    if any("loss" in r for r in records):
        parts.append("train loss at each logged step")
    if any("eval_loss" in r for r in records):
        parts.append("eval loss at each evaluation")
    else:
        parts.append("no eval loss (the run evaluated no loss during training)")
    text = f"cross-entropy per trained token: {', '.join(parts)}"
    if names := score_names(records):
        text += f"; below, the held-out scores of each evaluation during training ({', '.join(names)})"
    return text + " (from metrics.jsonl)"


def metrics_note(evaluation: dict[str, Any]) -> str:
    """How the metrics in the table were measured: only those it shows."""
    shown = {row["key"] for row in metric_rows(evaluation)}
    notes = []
    if "eval_loss" in shown:
        notes.append("Loss: cross-entropy per trained token on the eval data; perplexity = e<sup>loss</sup>.")
    if "exact_match" in shown:
        notes.append("Exact match after trimming whitespace; ROUGE-L F1 from rouge-score.")
    if shown & {"json_valid", "json_match"}:
        notes.append("JSON rows because every reference is JSON.")
    if any(key.startswith("tool_") for key in shown):
        notes.append("Tool rows: calls read from each answer in the template's syntax, beside the reference's.")
    return " ".join(notes) or "No metrics: this evaluation measured nothing."


def run_summary(run: dict[str, Any]) -> list[tuple[str, str]]:
    """The run's settings and outcome that matter when reading its scores, as (label, value) pairs."""
    c = run["config"]
    model, data, peft, tc = c["model"], c["data"], c["peft_config"], c["training_config"]
    lora = f"r {peft['r']}, alpha {peft['lora_alpha']}, dropout {peft['lora_dropout']}, {peft['target_modules']}"
    lora += "".join(f", {name}" for name in ("use_dora", "use_rslora") if peft.get(name))
    if peft.get("init_lora_weights") is not True:
        lora += f", init {peft.get('init_lora_weights')}"
    params = run.get("parameters") or {}
    eval_data = data["eval"] if data["eval"] is not None else "the sample eval split" if data["train"] is None else ""
    weights = str(run.get("model_dtype", model["dtype"])) + (
        f", {model['quantization']}" if model["quantization"] else ""
    )
    speed = f"{run.get('train_seconds', 0):.0f} s, {run.get('tokens_per_s', 0):,.0f} tokens/s on {run.get('device')}"
    final = _number(run.get("final_loss"))
    if run.get("final_eval_loss") is not None:
        final += f" (eval {_number(run['final_eval_loss'])})"
    rows = [
        ("base model", model["name_or_path"] or "the embedded model (SmolLM2-135M-Instruct as Phi-3)"),
        ("weights", weights),
        ("LoRA", lora),
        ("trainable", f"{params['trainable']:,} of {params['total']:,} parameters" if params else ""),
        ("train data", data["train"] or "the sample dataset"),
        ("eval data", str(eval_data)),
        ("sequences", f"max_length {data['max_length']}, packing {data['packing']}, train_on {data['train_on']}"),
        ("optimizer", f"lr {tc['learning_rate']:g} {tc['lr_scheduler_type']}, batch {tc['per_device_train_batch_size']}"
                      f" × {tc['gradient_accumulation_steps']} accumulated, seed {tc['seed']}"),
        ("steps", f"{run.get('steps', '?')}, {run.get('trained_tokens', 0):,} trained tokens"),
        ("time", speed),
        ("final loss", final),
        ("adapter", selection_summary(run.get("selection"))),
    ]  # fmt: skip
    return [(k, v) for k, v in rows if v]


def selection_summary(chosen: dict[str, Any] | None) -> str:
    """Which step's weights the adapter holds and why, for a run that evaluated during training."""
    if not chosen:
        return ""
    metric, greater = chosen["metric"], chosen["greater_is_better"]

    def value(v: float) -> str:
        return f"{v:.4f}" if metric.endswith(("loss", "ppl")) else f"{100 * v:.1f}%"

    best = (
        f"the best {metric} ({'higher' if greater else 'lower'} is better) was {value(chosen['best_value'])} at "
        f"step {chosen['best_step']}"
    )
    if chosen["adapter_step"] == chosen["best_step"] and chosen.get("load_best_model_at_end"):
        text = (
            f"step {chosen['adapter_step']}, chosen by load_best_model_at_end: {best}; the last evaluation "
            f"(step {chosen['last_step']}) had {value(chosen['last_value'])}"
        )
    else:
        text = f"the last step ({chosen['adapter_step']}): {value(chosen['adapter_value'])}; {best}"
    if chosen.get("stopped_early"):
        text += (
            f"; stopped early at step {chosen['last_step']} after {chosen['early_stopping_patience']} "
            "evaluations without improving"
        )
    return text


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "–"


def samples_section(evaluation: dict[str, Any]) -> str:
    samples = evaluation["samples"]
    if not samples:
        return '<p class="note">No prompts to answer in this data (text rows have none), so no generations.</p>'
    shown = samples[:HTML_SAMPLES]
    runs = [r for r in RUNS if r in samples[0]]
    parts = []
    if len(shown) < len(samples):
        parts.append(f'<p class="meta">The first {len(shown)} of {len(samples)}; eval.json has them all.</p>')
    misses = [miss(s) for s in shown]
    if "after" in runs:
        parts.append(
            f'<p class="meta" id="view"><label><input type="checkbox" id="misses-first"> misses first: the '
            f"{sum(misses)} of {len(shown)} the fine-tuned model did not answer exactly, at the top</label></p>"
        )
    articles = []
    for i, s in enumerate(shown, 1):
        context = "".join(
            f'<div class="label">{_e(m["role"])}</div><pre>{_e(message_text(m))}</pre>' for m in s["prompt"][:-1]
        )
        last = s["prompt"][-1] if s["prompt"] else {"role": "user", "content": ""}
        earlier = f"<details><summary>{len(s['prompt']) - 1} earlier message(s)</summary>{context}</details>"
        answers = [("reference", s["reference"], "")]
        for r in runs:
            hit = s[r].strip() == s["reference"].strip()
            badge = f'<span class="badge {"hit" if hit else "miss"}">{"exact" if hit else "differs"}</span>'
            answers.append((RUNS[r], s[r], badge))
        cells = "".join(
            f'<div data-answer="{_e(name)}"><span class="label">{_e(name)}</span>{badge}<pre>{_e(text)}</pre></div>'
            for name, text, badge in answers
        )
        articles.append(
            f'<article class="sample" id="sample-{i}" data-index="{i}" data-miss="{int(misses[i - 1])}">'
            f"<h3>#{i}</h3>{earlier if context else ''}"
            f'<div class="label">{_e(last["role"])}</div><pre>{_e(message_text(last))}</pre>'
            f'<div class="answers">{cells}</div></article>'
        )
    return "".join(parts) + f'<div id="samples">{"".join(articles)}</div>'


def miss(sample: dict[str, Any]) -> bool:
    """Whether the fine-tuned model's answer is not the reference (after trimming whitespace, as exact match)."""
    return "after" in sample and sample["after"].strip() != sample["reference"].strip()


def render(evaluation: dict[str, Any], run: dict[str, Any] | None, records: list[dict[str, Any]] | None) -> str:
    """report.html for an evaluation, with the run's settings and loss curve when they are known."""
    settings = evaluation.get("settings", {})
    title = f"philora eval: {settings.get('run') or settings.get('adapter') or 'adapter'}"
    about = ", ".join(
        _e(part)
        for part in (
            f"base {settings['base_model']}" if settings.get("base_model") else "",
            f"data {settings['data']}" if settings.get("data") else "",
            f"{settings.get('loss_samples', 0)} samples for the loss",
            f"{evaluation['prompts']} prompts, greedy, at most {settings.get('max_new_tokens', '?')} new tokens",
            settings.get("created", ""),
        )
        if part
    )
    if run is not None:
        summary = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in run_summary(run))
        run_html = f'<table id="run">{summary}</table>'
    else:
        run_html = (
            '<p class="note" id="no-run">No run.json next to this adapter, so its training settings are unknown.</p>'
        )
    versions = ", ".join(f"{k} {v}" for k, v in evaluation.get("versions", {}).items() if v)
    script_hash = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    policy = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{policy}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{_e(title)}</h1>
<p class="meta">{about}</p>
<h2>Metrics</h2>
{metrics_table(evaluation)}
<p class="meta">{metrics_note(evaluation)}</p>
<h2>Loss curve</h2>
{loss_section(records)}
<h2>Run</h2>
{run_html}
<h2>Samples</h2>
{samples_section(evaluation)}
<footer>{_e(versions)}</footer>
<script>{SCRIPT}</script>
</body>
</html>
"""


def markdown_table(evaluation: dict[str, Any]) -> list[str]:
    """The metric table as Markdown lines: base beside fine-tuned, with the difference when both are there."""
    runs = present_runs(evaluation)
    both = len(runs) == 2
    header = ["metric", *(RUNS[r] for r in runs), *(["Δ"] if both else [])]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for row in metric_rows(evaluation):
        cells = [row["label"], *(format_value(row["kind"], row[r]) for r in runs)]
        cells += [format_delta(row["kind"], row["delta"])] if both else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(evaluation: dict[str, Any]) -> str:
    """eval.md: the metric table and the first few samples, for a README, an issue or a pull request."""
    runs = present_runs(evaluation)
    settings = evaluation.get("settings", {})
    lines = ["# philora eval", ""]
    facts = [f"{k}: `{settings[k]}`" for k in ("adapter", "base_model", "data") if settings.get(k)]
    facts.append(f"{evaluation['prompts']} prompts, greedy, at most {settings.get('max_new_tokens', '?')} new tokens")
    lines += ["; ".join(facts) + ".", "", *markdown_table(evaluation)]
    samples = evaluation["samples"][:MD_SAMPLES]
    if samples:
        lines += ["", f"## Samples (the first {len(samples)} of {len(evaluation['samples'])})"]
    for i, s in enumerate(samples, 1):
        lines += ["", f"### {i}", ""]
        for m in s["prompt"]:
            lines += [f"**{m['role']}**", "", _fenced(message_text(m)), ""]
        for name, text in [("reference", s["reference"]), *((RUNS[r], s[r]) for r in runs if r in s)]:
            lines += [f"**{name}**", "", _fenced(text), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def message_text(message: dict[str, Any]) -> str:
    """A prompt message as the report shows it: its text, then each tool call it makes as `→ name(arguments)`."""
    calls = [
        f"→ {c['function']['name']}({json.dumps(c['function']['arguments'], ensure_ascii=False)})"
        for c in message.get("tool_calls", [])
    ]
    return "\n".join([message["content"], *calls] if message["content"] else calls)


def _fenced(text: str) -> str:
    """A code block that no run of backticks inside the text can close early."""
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


def check_output(out: Path) -> None:
    """Refuse an output dir where eval.json, eval.md or report.html is a file philora did not write: it would be
    overwritten. An earlier evaluation's files are replaced."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out}: is a file; choose another --output, a new or empty directory")
    if foreign := [name for name in EVAL_FILES if (out / name).exists() and not written_here(out / name)]:
        raise UserError(
            f"--output {out}: its {', '.join(foreign)} was not written by philora and would be overwritten; choose "
            "another --output, a new or empty directory"
        )


def written_here(path: Path) -> bool:
    """Whether an eval file is one philora wrote (an earlier evaluation), told by what it holds."""
    try:
        text = path.read_text(encoding="utf-8")
        value = json.loads(text) if path.name == EVAL_FILES[0] else None
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return False
    if path.name == EVAL_FILES[0]:
        return isinstance(value, dict) and "settings" in value and "samples" in value
    return text.startswith("# philora eval\n") if path.suffix == ".md" else "<title>philora eval: " in text


def write_results(out: Path, evaluation: dict[str, Any], run_dir: Path | None) -> list[Path]:
    """eval.json, eval.md and report.html in `out`; the report shows the run in `run_dir` (its run.json and the
    loss curve from its metrics.jsonl) when there is one."""
    check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    run, records = read_run(run_dir)
    texts = (
        json.dumps(evaluation, indent=2, ensure_ascii=False) + "\n",
        markdown(evaluation),
        render(evaluation, run, records),
    )
    files = dict(zip(EVAL_FILES, texts, strict=True))  # eval.json, eval.md, report.html
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return [out / name for name in files]
