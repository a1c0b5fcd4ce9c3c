"""`philora data check FILE`: read and encode one data source the way `train` would, and say what came out."""

from __future__ import annotations

import json
import sys
from typing import Any

from philora.config import Config
from philora.data import Split, load_source, problem_lines
from philora.data.render import ChatEncoder
from philora.data.report import (
    highlight,
    segments,
    shown_sample,
    source_line,
    source_stats,
    split_lines,
    split_stats,
)


def check(config: Config, spec: str, tokenizer: Any, as_json: bool = False, context: int | None = None) -> int:
    """Print the report for `spec` encoded with `tokenizer` (the config's model's, whose `context` bounds an auto
    max_length); exit status 2 when any row is rejected, so scripts can gate on it."""
    dc = config.data
    encoder = ChatEncoder(tokenizer)
    source = load_source(spec, "train", dc, encoder, context)  # max_length: null is chosen from this file
    split = Split(source.records)
    stats = split_stats(split, dc.max_length)
    first = shown_sample(split) if split.samples else None
    if as_json:
        sample = [{"text": t, "trained": trained} for t, trained in segments(first, encoder.tokenizer)] if first else []
        length = {"max_length": dc.max_length, "auto": source.length is not None}
        record = {**source_stats(source), **stats, **length, "problems": source.problems, "sample": sample}
        print(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        lines = [source_line("data", source), *split_lines("data", stats, dc.max_length, dc.overlong)]
        if source.length is not None:
            lines.insert(1, f"data: {source.length.describe(dc.overlong)}")
        if first is not None:
            lines += highlight(first, encoder.tokenizer, color=sys.stdout.isatty())
        print("\n".join(lines))
    if source.problems:
        for line in problem_lines(source.problems):
            print(f"philora: error: {line}", file=sys.stderr)
        return 2
    return 0
