"""A sweep's results, rewritten after every trial so that a kill leaves them current: the table (on stderr at the
end, and sweep.md) and sweep.html, one self-contained page (inline CSS, one scatter per swept key as an inline PNG,
no external URL, no script) that opens anywhere, offline."""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from philora.progress import duration
from philora.sweep.space import Range, value_text


@dataclass
class Row:
    """One trial as the table shows it; `value` is the metric's own value (not the study's signed score)."""

    number: int
    params: dict[str, Any]
    value: float | None
    status: str  # complete, pruned, failed, interrupted, waiting
    steps: int | None = None
    train_seconds: float | None = None
    wall_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    rank: int | None = None

    @property
    def name(self) -> str:
        return trial_name(self.number)


def trial_name(number: int) -> str:
    return f"trial-{number:03d}"


def rows(trials: list[Any], greater_is_better: bool) -> list[Row]:
    """The study's trials (Optuna FrozenTrials) as rows: the complete ones best first and ranked, then the pruned
    ones by their last value, then the rest by number."""
    retried = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    found = []
    for t in trials:
        attrs = t.user_attrs
        status = t.state.name.lower()
        notes = []
        if status == "fail":
            interrupted = "returncode" not in attrs  # the sweep records how every trial it saw end ended
            status = "interrupted" if interrupted else "failed"
            notes.append("the sweep was stopped" if interrupted else attrs.get("error", f"exit {attrs['returncode']}"))
        if t.number in retried:
            notes.append(f"tried again as {trial_name(retried[t.number])}")
        if "retry_of" in attrs:
            notes.append(f"again after {trial_name(attrs['retry_of'])}")
        if attrs.get("stopped_early"):
            notes.append("stopped early")
        found.append(Row(t.number, dict(t.params), attrs.get("value"), status, attrs.get("steps"),
                         attrs.get("train_seconds"), attrs.get("wall_seconds"), notes))  # fmt: skip
    sign = 1 if greater_is_better else -1

    def order(row: Row) -> tuple[int, float, int]:
        group = {"complete": 0, "pruned": 1}.get(row.status, 2)
        score = -sign * row.value if row.value is not None and group < 2 else math.inf
        return group, score, row.number

    found.sort(key=order)
    for rank, row in enumerate((r for r in found if r.status == "complete" and r.value is not None), start=1):
        row.rank = rank
    return found


def best(found: list[Row]) -> Row | None:
    return next((r for r in found if r.rank == 1), None)


def table(found: list[Row], ranges: list[Range], metric: str) -> str:
    """The trials as a Markdown table (what stderr and sweep.md show)."""
    names = _param_names(ranges)
    header = ["rank", "trial", *names.values(), metric, "steps", "status", "train", "wall"]
    lines = [header]
    for r in found:
        params = [_param(r.params.get(key)) for key in names]
        status = r.status + (f" ({'; '.join(r.notes)})" if r.notes else "")
        lines.append([str(r.rank or "-"), r.name, *params, _value(r.value), _count(r.steps), status,
                      _seconds(r.train_seconds), _seconds(r.wall_seconds)])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text) + "\n"


def summary(found: list[Row], metric: str, greater_is_better: bool) -> str:
    counts = {s: sum(r.status == s for r in found) for s in ("complete", "pruned", "failed", "interrupted")}
    said = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    way = "higher" if greater_is_better else "lower"
    return f"{len(found)} trials ({said or 'none finished'}); {metric}, {way} is better"


def write_markdown(path: Path, found: list[Row], ranges: list[Range], metric: str, greater_is_better: bool) -> None:
    text = f"# philora sweep\n\n{summary(found, metric, greater_is_better)}.\n\n{table(found, ranges, metric)}"
    _write(path, text)


CSS = """body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; } th, td { border: 1px solid #ccc; padding: .3em .6em; }
td.n { text-align: right; font-variant-numeric: tabular-nums; } tr.best { background: #eef7e8; }
.meta { color: #666; } figure { display: inline-block; margin: 0 1em 1em 0; } img { max-width: 100%; }"""


def write_html(path: Path, found: list[Row], ranges: list[Range], metric: str, greater_is_better: bool,
               command: str | None) -> None:  # fmt: skip
    """sweep.html: the summary, the table, and the metric against each swept key."""
    names = _param_names(ranges)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in
                   ["rank", "trial", *names.values(), metric, "steps", "status", "train", "wall"])  # fmt: skip
    body = []
    for r in found:
        status = r.status + (f" ({'; '.join(r.notes)})" if r.notes else "")
        cells = [str(r.rank or "-"), r.name, *(_param(r.params.get(k)) for k in names), _value(r.value),
                 _count(r.steps), status, _seconds(r.train_seconds), _seconds(r.wall_seconds)]  # fmt: skip
        numeric = {0, *range(2, len(names) + 4)}  # rank, the values, the metric, steps
        tds = "".join(f"<td{' class=n' if i in numeric else ''}>{html.escape(c)}</td>" for i, c in enumerate(cells))
        body.append(f"<tr{' class=best' if r.rank == 1 else ''}>{tds}</tr>")
    figures = "".join(_figure(found, r, metric) for r in ranges)
    then = f"<p>Train the best: <code>{html.escape(command)}</code></p>" if command else ""
    policy = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{policy}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>philora sweep</title>
<style>{CSS}</style>
</head>
<body>
<h1>philora sweep</h1>
<p class="meta">{html.escape(summary(found, metric, greater_is_better))}.</p>
{then}
<table><tr>{head}</tr>
{chr(10).join(body)}
</table>
<h2>{html.escape(metric)} by value</h2>
<p class="meta">Each finished trial; a pruned one at the last value it reached, hollow.</p>
{figures}
</body>
</html>
"""
    _write(path, page)


def _figure(found: list[Row], r: Range, metric: str) -> str:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set here, not at import
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.4), dpi=100)
    choices = [value_text(c) for c in r.choices] if r.choices is not None else None
    for status, style in (("complete", {"color": "#2f6db5"}), ("pruned", {"facecolors": "none", "color": "#d9822b"})):
        points = [(row.params[r.key], row.value) for row in found if row.status == status and row.value is not None
                  and r.key in row.params]  # fmt: skip
        if choices is not None:
            points = [(choices.index(value_text(x)), y) for x, y in points]
        if points:
            ax.scatter(*zip(*points, strict=True), label=status, **style)
    top = best(found)
    if top is not None and r.key in top.params and top.value is not None:
        x = choices.index(value_text(top.params[r.key])) if choices is not None else top.params[r.key]
        ax.scatter([x], [top.value], marker="*", s=180, color="#2e8b3d", label=f"best ({top.name})", zorder=3)
    if choices is not None:
        ax.set_xticks(range(len(choices)), choices)
        ax.set_xlim(-0.5, len(choices) - 0.5)
    else:  # the whole range, to show where in it the trials fell
        _range_axis(ax, r)
    ax.set_xlabel(r.key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if ax.collections:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    alt = html.escape(f"{metric} by {r.key}")
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"></figure>'


def _range_axis(ax: Any, r: Range) -> None:
    """The x axis from LOW to HIGH; a log range labelled at 1, 2 and 5 times each power of ten, as plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = float(r.low), float(r.high)  # type: ignore[arg-type]
    if r.log:
        ax.set_xscale("log")
        ax.set_xlim(low / 1.15, high * 1.15)
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        margin = (high - low) * 0.05
        ax.set_xlim(low - margin, high + margin)


def _param_names(ranges: list[Range]) -> dict[str, str]:
    """Each swept key's column header: its name without the section, unless two sections share the name."""
    short = [r.name for r in ranges]
    return {r.key: r.name if short.count(r.name) == 1 else r.key for r in ranges}


def _param(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else value_text(value)


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _seconds(value: float | None) -> str:
    return "-" if value is None else duration(value)


def _write(path: Path, text: str) -> None:
    """Written whole or not at all: a kill mid-write leaves the previous version."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
