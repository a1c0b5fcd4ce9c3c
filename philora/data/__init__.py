"""From data files to token samples: read, validate, render with loss masks, report what happened."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from philora.config import DataSection
from philora.data.readers import Conversation, read_jsonl
from philora.data.render import ChatEncoder, Sample, TemplateError
from philora.errors import UserError

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample"
MAX_LISTED_PROBLEMS = 10


@dataclass
class Split:
    conversations: list[Conversation]
    samples: list[Sample]
    dropped_too_long: int = 0


@dataclass
class PreparedData:
    train: Split
    eval: Split | None
    encoder: ChatEncoder
    files: list[Path]
    skipped: list[str] = field(default_factory=list)  # problems of rows skipped under on_bad_row: skip

    @property
    def sha256(self) -> str:
        """Hash of the data files' bytes, recorded in run.json."""
        h = hashlib.sha256()
        for path in self.files:
            h.update(path.read_bytes())
        return h.hexdigest()


def data_files(dc: DataSection) -> tuple[Path, Path | None]:
    """The train file and eval file (None when eval is absent or a fraction of train)."""
    if dc.train is None:
        return SAMPLE_DIR / "train.jsonl", (Path(dc.eval) if isinstance(dc.eval, str) else SAMPLE_DIR / "eval.jsonl")
    train = Path(dc.train).expanduser()
    if not train.exists():
        raise UserError(f"data.train: {dc.train}: no such file")
    eval_path = Path(dc.eval).expanduser() if isinstance(dc.eval, str) else None
    if eval_path is not None and not eval_path.exists():
        raise UserError(f"data.eval: {dc.eval}: no such file")
    return train, eval_path


def prepare(dc: DataSection, tokenizer: Any, seed: int) -> PreparedData:
    """Read and encode train and eval data; raise one UserError listing bad rows unless on_bad_row is skip."""
    encoder = ChatEncoder(tokenizer)
    train_path, eval_path = data_files(dc)
    problems: list[str] = []
    train_rows = _read(train_path, problems)
    eval_rows = _read(eval_path, problems) if eval_path else None
    if isinstance(dc.eval, float):
        shuffled = list(train_rows)
        random.Random(seed).shuffle(shuffled)
        n_eval = max(1, round(len(shuffled) * dc.eval))
        eval_rows, train_rows = shuffled[:n_eval], shuffled[n_eval:]
    if eval_rows is not None and dc.max_eval_samples is not None:
        eval_rows = eval_rows[: dc.max_eval_samples]
    train = _encode(train_rows, encoder, dc, problems)
    evals = _encode(eval_rows, encoder, dc, problems) if eval_rows is not None else None
    if problems and dc.on_bad_row == "error":
        listed = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        tail = f"{len(problems)} bad rows in all" + (f" ({more} more not listed)" if more else "")
        raise UserError(*listed, f"{tail}; fix them, or set data.on_bad_row: skip to train without them")
    if not train.samples:
        raise UserError(f"data.train: {train_path}: no usable conversations")
    files = [train_path] + ([eval_path] if eval_path else [])
    return PreparedData(train, evals, encoder, files, problems)


def _read(path: Path, problems: list[str]) -> list[Conversation]:
    result = read_jsonl(path)
    problems += result.problems
    return result.conversations


def _encode(rows: list[Conversation], encoder: ChatEncoder, dc: DataSection, problems: list[str]) -> Split:
    split = Split([], [])
    for row in rows:
        try:
            sample = encoder.encode(row.messages, dc.train_on)
        except TemplateError as e:
            problems.append(f"{row.source}: {e}")
            continue
        if len(sample.input_ids) > dc.max_length:
            split.dropped_too_long += 1
            continue
        if sample.trained == 0:
            problems.append(f"{row.source}: no trained tokens (every assistant message has train: false)")
            continue
        split.conversations.append(row)
        split.samples.append(sample)
    return split


def summary(data: PreparedData, name: str = "train") -> str:
    split = data.train if name == "train" else data.eval
    assert split is not None
    tokens = sum(len(s.input_ids) for s in split.samples)
    trained = sum(s.trained for s in split.samples)
    lengths = sorted(len(s.input_ids) for s in split.samples)
    line = (
        f"philora: {name}: {len(split.samples)} conversations, {tokens:,} tokens "
        f"({100 * trained / max(tokens, 1):.0f}% trained), length p50 {lengths[len(lengths) // 2]} "
        f"max {lengths[-1]}"
    )
    if split.dropped_too_long:
        line += f"; {split.dropped_too_long} longer than data.max_length dropped"
    return line
