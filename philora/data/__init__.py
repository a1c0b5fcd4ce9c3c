"""From data sources to token samples: read, detect the format, render with loss masks, fit to max_length,
and account for every row (kept, cut, split, dropped, or rejected with its file:line and reason)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from philora.config import Config, DataSection
from philora.data import cache, lengths
from philora.data.encode import Outcome, encode_all
from philora.data.formats import (
    EXAMPLES,
    Columns,
    Conversation,
    RowProblem,
    check_columns,
    detect,
    to_conversation,
)
from philora.data.render import ChatEncoder, Sample
from philora.data.sources import ROW_BYTES_FLOOR, ROW_BYTES_PER_TOKEN, read_source
from philora.errors import UserError, first_problems
from philora.paths import SAMPLE_PREFIX

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample"


@dataclass
class Record:
    conversation: Conversation
    outcome: Outcome


@dataclass
class SourceData:
    """One source, read and encoded."""

    name: str
    format: str
    rows: int  # rows read, good and bad
    records: list[Record]  # the rows that were not rejected
    problems: list[str]  # the rejected rows, 'where: why', in file order
    digest: str
    from_cache: bool
    untrained: int = 0  # rejected rows with no trained token (every answer train: false)
    length: lengths.LengthChoice | None = None  # what data.max_length: null chose from this source


@dataclass
class Split:
    records: list[Record]

    @property
    def conversations(self) -> list[Conversation]:
        return [r.conversation for r in self.records if r.outcome.samples]

    @property
    def samples(self) -> list[Sample]:
        return [s for r in self.records for s in r.outcome.samples]

    @property
    def pairs(self) -> list[tuple[Sample, Sample]]:
        """The (chosen, rejected) samples of the preference pairs."""
        return [(r.outcome.samples[0], r.outcome.samples[1]) for r in self.records
                if r.conversation.rejected is not None and r.outcome.samples]  # fmt: skip

    def count(self, fit: str) -> int:
        return sum(r.outcome.fit == fit for r in self.records)

    def kinds(self) -> tuple[list[Record], list[Record]]:
        """(preference pairs, conversations) among the records."""
        pairs = [r for r in self.records if r.conversation.rejected is not None]
        return pairs, [r for r in self.records if r.conversation.rejected is None]


@dataclass
class PreparedData:
    train: Split
    eval: Split | None
    encoder: ChatEncoder
    sources: list[SourceData]
    problems: list[str] = field(default_factory=list)  # every rejected row of every source

    @property
    def fingerprint(self) -> str:
        """Hash of the sources' content, recorded in run.json."""
        return hashlib.sha256("".join(s.digest for s in self.sources).encode()).hexdigest()

    @property
    def length(self) -> lengths.LengthChoice | None:
        """What data.max_length: null chose from the training data; None where it was set."""
        return self.sources[0].length


def source_specs(dc: DataSection, method: str = "sft") -> tuple[str, str | None]:
    """The train source and the eval source (None when eval is absent or a fraction of train). Without
    data.train, the sample dataset: its conversations for sft, its preference pairs for dpo and orpo."""
    if dc.train is None:
        prefix = "" if method == "sft" else "preference-"
        sample_eval = str(SAMPLE_DIR / f"{prefix}eval.jsonl")
        return str(SAMPLE_DIR / f"{prefix}train.jsonl"), dc.eval if isinstance(dc.eval, str) else sample_eval
    return dc.train, dc.eval if isinstance(dc.eval, str) else None


def sample(spec: str) -> str:
    """`sample:NAME` is philora's shipped philora/sample/NAME.jsonl (the demos' data); other specs are as given."""
    if not spec.startswith(SAMPLE_PREFIX):
        return spec
    path = SAMPLE_DIR / f"{spec.removeprefix(SAMPLE_PREFIX)}.jsonl"
    if not path.is_file():
        names = ", ".join(f"{SAMPLE_PREFIX}{p.stem}" for p in sorted(SAMPLE_DIR.glob("*.jsonl")))
        raise UserError(f"{spec}: no such sample dataset; philora ships {names}")
    return str(path)


def load_source(
    spec: str, purpose: str, dc: DataSection, encoder: ChatEncoder, context: int | None = None
) -> SourceData:
    """Read, convert and encode one source, reusing the cached encoding of identical inputs. With data.max_length
    null (auto), the length is chosen from this source's samples and set in `dc` (so the eval source that follows,
    the plan and run.json get the number); `context` is the model's, None to take the tokenizer's."""
    limit = row_limit(dc)
    source = read_source(sample(spec), purpose, limit)
    columns = Columns(dc.columns)
    formats = []  # per file: a folder may mix formats
    rows: list[Conversation | str] = []  # a conversation, or the problem that rejected the row
    for part in source.parts:
        fmt = detect(part, columns) if dc.format == "auto" else dc.format
        check_columns(part, fmt, columns)
        formats.append(fmt)
        for raw in part.rows:
            try:
                rows.append(to_conversation(raw.value, raw.where, fmt, columns))
            except RowProblem as e:
                rows.append(f"{raw.where}: {e}")
    conversations = [r for r in rows if isinstance(r, Conversation)]
    if any(c.tools for c in conversations):
        encoder.use_tools()  # before the cache key: a template given tools support is another template
    digest = source.digest.hexdigest()
    # auto: encoded once with rows as long as auto may choose, then fitted to the length the samples call for
    auto = dc.max_length is None
    length = lengths.cap(context or getattr(encoder.tokenizer, "model_max_length", None)) if auto else dc.max_length
    settings = (dc.train_on, length, dc.overlong, dc.train_on_reasoning)
    # the row limit decides which rows reach the encoder
    entry = cache.key(digest, formats, columns.mapping, cache.tokenizer_fingerprint(encoder.tokenizer), settings, limit)
    outcomes = cache.load(entry) if dc.cache else None
    from_cache = outcomes is not None and len(outcomes) == len(conversations)
    if not from_cache:
        outcomes = encode_all(conversations, encoder, settings, dc.num_proc)
        if dc.cache:
            cache.save(entry, outcomes)
    assert outcomes is not None
    choice = None
    if auto:
        outcomes, choice = follow_data(conversations, outcomes, encoder, settings, dc.num_proc)
        dc.max_length = choice.length
    found = iter(zip(conversations, outcomes, strict=True))
    records, problems = [], []
    for row in rows:
        if isinstance(row, str):
            problems.append(row)
            continue
        conversation, outcome = next(found)
        if outcome.problem:
            problems.append(f"{conversation.source}: {outcome.problem}")
        else:
            records.append(Record(conversation, outcome))
    untrained = sum(o.fit == "untrained" for o in outcomes)
    described = "+".join(dict.fromkeys(formats))
    return SourceData(spec, described, len(rows), records, problems, digest, from_cache, untrained, choice)


def follow_data(
    conversations: list[Conversation],
    outcomes: list[Outcome],
    encoder: ChatEncoder,
    settings: tuple[str, int, str, bool],
    num_proc: int | None,
) -> tuple[list[Outcome], lengths.LengthChoice]:
    """max_length auto: the length chosen from `outcomes` (encoded with rows of the cap, settings[1]), and the
    outcomes at that length. Only the conversations it makes too long are encoded again: every other one comes out
    the same at any length it fits."""
    train_on, cap, overlong, reasoning = settings
    choice = lengths.choose([len(s.input_ids) for o in outcomes for s in o.samples], cap)
    again = [i for i, o in enumerate(outcomes) if o.problem is None
             and (o.fit != "whole" or any(len(s.input_ids) > choice.length for s in o.samples))]  # fmt: skip
    fitted = list(outcomes)
    if again:
        redone = encode_all([conversations[i] for i in again], encoder, (train_on, choice.length, overlong, reasoning),
                            num_proc)  # fmt: skip
        for i, outcome in zip(again, redone, strict=True):
            fitted[i] = outcome
    return fitted, replace(choice, cut=sum(o.fit in ("truncated", "split", "dropped") for o in fitted))


def row_limit(dc: DataSection) -> int:
    """The most bytes a row may take before it is rejected unread: data.max_row_bytes, or by default 1 MiB or a
    multiple of max_length (auto: of the longest it may choose), the larger."""
    if dc.max_row_bytes is not None:
        return dc.max_row_bytes
    return max(ROW_BYTES_FLOOR, ROW_BYTES_PER_TOKEN * (dc.max_length or lengths.AUTO_CAP))


def prepare(dc: DataSection, tokenizer: Any, seed: int, method: str = "sft", context: int | None = None
            ) -> PreparedData:  # fmt: skip
    """Train and eval data, every rejected row in `problems`; `require_usable` decides whether they stop the run.
    data.max_length null (auto) is resolved here, from the training data, and set in `dc`; `context` is the model's
    (None: the tokenizer's model_max_length)."""
    encoder = ChatEncoder(tokenizer)
    train_spec, eval_spec = source_specs(dc, method)
    sources = [load_source(train_spec, "train", dc, encoder, context)]
    train_records = sources[0].records
    eval_records = None
    if eval_spec is not None:
        sources.append(load_source(eval_spec, "eval", dc, encoder))
        eval_records = sources[1].records
    elif isinstance(dc.eval, float):
        shuffled = list(train_records)
        random.Random(seed).shuffle(shuffled)
        n_eval = max(1, round(len(shuffled) * dc.eval))
        eval_records, train_records = shuffled[:n_eval], shuffled[n_eval:]
    if eval_records is not None and dc.max_eval_samples is not None:
        eval_records = eval_records[: dc.max_eval_samples]
    problems = [p for s in sources for p in s.problems]
    evals = Split(eval_records) if eval_records is not None else None
    return PreparedData(Split(train_records), evals, encoder, sources, problems)


def require_usable(prepared: PreparedData, dc: DataSection, method: str = "sft") -> None:
    """Stop on bad rows (unless on_bad_row is skip), on training data with nothing to train on, and on data
    of the wrong kind for the method: preference pairs for dpo and orpo, conversations for sft."""
    if prepared.problems and dc.on_bad_row == "error":
        raise UserError(*problem_lines(prepared.problems))
    if not prepared.train.samples:
        raise UserError(f"data.train: {prepared.sources[0].name}: no usable conversations")
    for name, split in (("train", prepared.train), ("eval", prepared.eval)):
        if split is None:
            continue
        pairs, singles = split.kinds()
        if method == "sft" and pairs:
            raise UserError(
                f"data.{name}: {pairs[0].conversation.source}: a preference pair (chosen/rejected); sft trains on "
                "conversations: set training_config.method: dpo or orpo to learn from pairs"
            )
        if method != "sft" and singles:
            raise UserError(
                f"data.{name}: {singles[0].conversation.source}: not a preference pair ({len(singles)} such rows); "
                f"training_config.method: {method} learns from rows like {EXAMPLES['preference']}"
            )


def resolved_lines(config: Config, prepared: PreparedData) -> list[str]:
    """What auto chose from this data, a line each, for the check's report and train's notices: max_length (chosen
    by `prepare`) and generation_max_length (resolved here)."""
    lines = [prepared.length.describe(config.data.overlong)] if prepared.length is not None else []
    return lines + [line for line in [resolve_generation_length(config, prepared)] if line]


def resolve_generation_length(config: Config, prepared: PreparedData) -> str | None:
    """training_config.generation_max_length: null (auto) set from the eval data's reference answers (lengths.py);
    the line that says so, or None when the value was given or there is nothing to answer."""
    tc = config.training_config
    if tc.generation_max_length is not None:
        return None
    samples = prepared.eval.samples if prepared.eval is not None else []
    if not samples:  # stays null: `philora eval --data` on this run's adapter takes it from its own data
        return None
    tc.generation_max_length, longest = lengths.answer_budget(samples)
    why = f"auto: the longest reference answer is {longest} tokens, plus {lengths.ANSWER_MARGIN}"
    config.origins["training_config.generation_max_length"] = why
    return f"generation_max_length {tc.generation_max_length} ({why}; set it to choose)"


def problem_lines(problems: list[str]) -> list[str]:
    """The first bad rows, then the total and the fix."""
    listed, count = first_problems(problems)
    return [*listed, f"{count}; fix them, or set data.on_bad_row: skip to train without them"]
