"""What the data step did, for people (`philora data check` and `philora check` in full, `train` in one line) and for
machines (--json): rows read and rejected, the format, token lengths, what the length policy cut, how much is
trained, and one sample with its trained tokens highlighted."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from philora.data.render import IGNORE, Sample

if TYPE_CHECKING:
    from philora.config import DataSection
    from philora.data import PreparedData, SourceData, Split

BINS = 8
BAR = 30
ELIDE = 400  # untrained stretches longer than this many characters are shortened in the sample view
MAX_LINES = 40  # and samples longer than this many lines


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def split_stats(split: Split, max_length: int) -> dict[str, Any]:
    samples = split.samples
    lengths = sorted(len(s.input_ids) for s in samples)
    tokens, trained = sum(lengths), sum(s.trained for s in samples)
    width = math.ceil(max_length / BINS)
    counts = [0] * BINS
    for n in lengths:
        counts[min((n - 1) // width, BINS - 1)] += 1
    return {
        "conversations": len(split.conversations),
        "samples": len(samples),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_fraction": round(trained / tokens, 4) if tokens else 0.0,
        "length": {
            "p50": percentile(lengths, 0.5),
            "p95": percentile(lengths, 0.95),
            "max": lengths[-1] if lengths else 0,
        },
        "histogram": [[i * width + 1, min((i + 1) * width, max_length), c] for i, c in enumerate(counts)],
        "truncated": split.count("truncated"),
        "split": split.count("split"),
        "dropped_overlong": split.count("dropped"),
        **({"pairs": pair_stats(split)} if split.pairs else {}),
        **({"tools": tool_stats(split)} if any(c.tools for c in split.conversations) else {}),
    }


def tool_stats(split: Split) -> dict[str, Any]:
    """Conversations with tools: how many offer tools and how many make calls, calls per calling conversation,
    tools offered per conversation, and how many assistant turns call or answer in words."""
    offering = [c for c in split.conversations if c.tools]
    turns = [m for c in offering for m in c.messages or [] if m["role"] == "assistant"]
    calls = sorted(sum(len(m.get("tool_calls", [])) for m in c.messages or []) for c in offering)
    calls = [n for n in calls if n]
    tools = sorted(len(c.tools or []) for c in offering)
    return {
        "rows_with_tools": len(offering),
        "rows_with_calls": len(calls),
        "calls_per_row": {"p50": percentile(calls, 0.5), "max": calls[-1] if calls else 0, "total": sum(calls)},
        "tools_per_row": {"p50": percentile(tools, 0.5), "max": tools[-1]},
        "parallel_call_turns": sum(len(m.get("tool_calls", [])) > 1 for m in turns),
        "answers_without_call": sum(not m.get("tool_calls") for m in turns),
    }


def pair_stats(split: Split) -> dict[str, Any]:
    """Preference pairs: how many, their answers' scored tokens, and how often the chosen answer is the longer and
    the shorter one (a preference a model can learn from length alone)."""
    pairs = split.pairs
    chosen, rejected = sorted(c.trained for c, _ in pairs), sorted(r.trained for _, r in pairs)
    return {
        "count": len(pairs),
        "chosen_answer_tokens": {"p50": percentile(chosen, 0.5), "max": chosen[-1]},
        "rejected_answer_tokens": {"p50": percentile(rejected, 0.5), "max": rejected[-1]},
        "chosen_longer": round(sum(c.trained > r.trained for c, r in pairs) / len(pairs), 4),
        "chosen_shorter": round(sum(c.trained < r.trained for c, r in pairs) / len(pairs), 4),
    }


def source_stats(source: SourceData) -> dict[str, Any]:
    return {
        "source": source.name,
        "format": source.format,
        "rows": source.rows,
        "rejected": len(source.problems),
        "nothing_to_train": source.untrained,
        "from_cache": source.from_cache,
    }


def source_line(role: str, source: SourceData) -> str:
    how = "from cache" if source.from_cache else "tokenised"
    return (
        f"{role} ← {source.name}: {source.format} format, {source.rows:,} rows, {len(source.problems)} rejected "
        f"({source.untrained} with nothing to train); {how}"
    )


def split_lines(name: str, stats: dict[str, Any], max_length: int, overlong: str, histogram: bool = True) -> list[str]:
    length = stats["length"]
    lines = [
        f"{name}: {stats['conversations']:,} conversations → {stats['samples']:,} samples, {stats['tokens']:,} tokens,"
        f" {100 * stats['trained_fraction']:.1f}% trained; length p50 {length['p50']}, p95 {length['p95']},"
        f" max {length['max']} (max_length {max_length})",
        f"{name}: longer than max_length (data.overlong: {overlong}): {stats['truncated']} truncated,"
        f" {stats['split']} split, {stats['dropped_overlong']} dropped",
    ]
    if pairs := stats.get("pairs"):
        chosen, rejected = pairs["chosen_answer_tokens"], pairs["rejected_answer_tokens"]
        lines.append(
            f"{name}: {pairs['count']:,} preference pairs; scored answer tokens p50 {chosen['p50']} chosen, "
            f"{rejected['p50']} rejected; the chosen answer is longer in {100 * pairs['chosen_longer']:.0f}%, shorter "
            f"in {100 * pairs['chosen_shorter']:.0f}% (a lopsided split is a preference for length a model can learn)"
        )
    if tools := stats.get("tools"):
        calls = tools["calls_per_row"]
        lines.append(
            f"{name}: tools offered in {tools['rows_with_tools']:,} conversations (p50 {tools['tools_per_row']['p50']},"
            f" max {tools['tools_per_row']['max']} each); {tools['rows_with_calls']:,} make {calls['total']:,} calls"
            f" (p50 {calls['p50']}, max {calls['max']} a conversation; {tools['parallel_call_turns']:,} turns call in "
            f"parallel); {tools['answers_without_call']:,} assistant turns answer without a call"
        )
    if not histogram:
        return lines
    peak = max((c for _, _, c in stats["histogram"]), default=0) or 1
    digits = len(str(max_length))
    for lo, hi, count in stats["histogram"]:
        bar = "█" * round(BAR * count / peak)
        lines.append(f"  {lo:>{digits}}-{hi:>{digits}} {bar:<{BAR}} {count:,}")
    return lines


def segments(sample: Sample, tokenizer: Any) -> list[tuple[str, bool]]:
    """The sample's text in runs of trained / not trained tokens."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(sample.input_ids.tolist(), sample.labels.tolist(), strict=True):
        trained = label != IGNORE
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    decode = tokenizer.decode
    return [(decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), t) for ids, t in runs]


def highlight(sample: Sample, tokenizer: Any, color: bool) -> list[str]:
    """The sample as text with trained tokens marked: green on a terminal, ⟦…⟧ elsewhere; long ones shortened."""
    legend = "trained tokens in green" if color else "trained tokens inside ⟦ ⟧"
    parts = []
    for text, trained in segments(sample, tokenizer):
        if not trained and len(text) > ELIDE:
            text = f"{text[:150]} … ({len(text) - 300:,} characters) … {text[-150:]}"
        if color:  # per line, so that every printed line starts and ends uncoloured
            code = "\x1b[1;32m" if trained else "\x1b[2m"
            text = "\n".join(f"{code}{line}\x1b[0m" if line else line for line in text.split("\n"))
        elif trained:
            text = f"⟦{text}⟧"
        parts.append(text)
    lines = "".join(parts).rstrip("\n").split("\n")
    if len(lines) > MAX_LINES:
        lines = [*lines[: MAX_LINES - 10], f"… ({len(lines) - MAX_LINES + 2} lines) …", *lines[-8:]]
    return [f"one sample, {legend}:", *lines]


def describe(prepared: PreparedData, dc: DataSection, color: bool = False) -> list[str]:
    """The report printed before training: sources, each split, rejected rows, one highlighted sample."""
    lines = [source_line(role, s) for role, s in zip(("train", "eval"), prepared.sources, strict=False)]
    for name, split in (("train", prepared.train), ("eval", prepared.eval)):
        if split is not None:
            lines += split_lines(name, split_stats(split, dc.max_length), dc.max_length, dc.overlong)
    if prepared.problems and dc.on_bad_row == "skip":
        lines.append(
            f"skipped {len(prepared.problems)} bad rows (data.on_bad_row: skip); the first: {prepared.problems[0]}"
        )
    if prepared.train.samples:
        lines += highlight(shown_sample(prepared.train), prepared.encoder.tokenizer, color)
    return lines


def summary(prepared: PreparedData, dc: DataSection) -> str:
    """The data in one line, for `train` (which `philora check` showed in full before): each split's rows, format,
    samples, tokens and lengths, what max_length cut or dropped, and the rows rejected."""
    parts = []
    for i, (name, split) in enumerate((("train", prepared.train), ("eval", prepared.eval))):
        if split is None:
            continue
        stats = split_stats(split, dc.max_length)
        length = stats["length"]
        fits = (("truncated", "truncated"), ("split", "split"), ("dropped_overlong", "dropped"))
        cut = ", ".join(f"{stats[k]:,} {what}" for k, what in fits if stats[k])
        source = prepared.sources[i] if i < len(prepared.sources) else None  # None: eval held out of train
        read = f"{source.rows:,} rows ({source.format})" if source else f"{len(split.records):,} rows held out"
        line = f"{name} {read} → {stats['samples']:,} samples, {stats['tokens']:,} tokens"
        if name == "train":
            line += (f", length p50 {length['p50']}, p95 {length['p95']}, max {length['max']} (max_length "
                     f"{dc.max_length}; {cut or 'none cut'})")  # fmt: skip
        elif cut:
            line += f" ({cut})"
        parts.append(line)
    rejected = len(prepared.problems)
    skipped = " (skipped: data.on_bad_row: skip)" if rejected and dc.on_bad_row == "skip" else ""
    return "; ".join(parts) + f"; {rejected:,} rows rejected{skipped}"


def shown_sample(split: Split) -> Sample:
    """The sample to show: the first of a conversation that calls tools, when there is one, else the first."""
    calling = (r for r in split.records if r.outcome.samples and any(
        m.get("tool_calls") for m in r.conversation.messages or []))  # fmt: skip
    record = next(calling, None)
    return record.outcome.samples[0] if record is not None else split.samples[0]


def as_record(prepared: PreparedData, dc: DataSection) -> dict[str, Any]:
    """The data part of run.json."""
    return {
        "sources": [source_stats(s) for s in prepared.sources],
        "fingerprint": prepared.fingerprint,
        "train": split_stats(prepared.train, dc.max_length),
        "eval": split_stats(prepared.eval, dc.max_length) if prepared.eval is not None else None,
        "rejected_rows": len(prepared.problems),
    }
