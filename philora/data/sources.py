"""Where rows come from: .jsonl, .json, .csv, .parquet files, folders of them, saved `datasets` dirs, hub ids.

Every row arrives with the place it came from (`file:line`, or `file: row N` where a format has no lines), so
a problem can always be named where the user can find it. Each file (or dataset split) is a Part, whose format
is detected on its own. Problems with a whole file (missing, unreadable, empty, a JSON array that does not parse)
stop at once as a UserError.

A row larger than the limit (data.max_row_bytes) is a bad row, told by its size alone before anything parses or
tokenises it. A .jsonl file is read a line at a time and an overlong line is skipped in chunks, never held whole.
The other kinds are read whole by their parsers (a CSV's or a JSON array's text, a parquet table), so there the
row is measured once parsed: its line span in a CSV, its text in a JSON array, its strings in parquet or a dataset.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import IO, Any

from philora.errors import UserError
from philora.paths import DATA_SUFFIXES, names_hub_dataset
from philora.progress import Phase

EVAL_SPLITS = ("validation", "eval", "test")
BOM = b"\xef\xbb\xbf"
SKIP_CHUNK = 1 << 20  # an overlong line is read past this many bytes at a time
MEGABYTE = 1_000_000  # the unit a .jsonl file's reading progress is counted in
# data.max_row_bytes: null is the larger of ROW_BYTES_FLOOR and this many bytes per token of max_length. Generous:
# a conversation far over max_length is legitimate (overlong: split makes several samples of it) and a MiB tokenizes
# in about a second; what must not pass is the row of tens of MB that costs minutes and gigabytes
ROW_BYTES_PER_TOKEN = 256
ROW_BYTES_FLOOR = 1 << 20


@dataclass
class BadRow:
    """A row that could not even be parsed: why."""

    reason: str


@dataclass
class RawRow:
    value: Any  # a dict from the file, or whatever the file held at that place
    where: str  # file:line or file: row N


@dataclass
class Part:
    """The rows of one file (or dataset split): the unit whose format is detected and whose columns are checked."""

    name: str
    rows: list[RawRow] = field(default_factory=list)
    columns: dict[str, str] | None = None  # a table's columns and their kinds (list, string, ...)


@dataclass
class Source:
    """The parts of one data source, and a fingerprint of its content for the cache key."""

    name: str
    parts: list[Part] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)

    @property
    def rows(self) -> list[RawRow]:
        return [row for part in self.parts for row in part.rows]


def read_source(spec: str, purpose: str, limit: int) -> Source:
    """Read a file, a folder, a saved `datasets` dir or a hub id (`owner/name` or `owner/name:split`); a row over
    `limit` bytes is a bad row."""
    path = Path(spec).expanduser()
    source = Source(spec)
    if path.is_dir():
        if _is_saved_dataset(path):
            _read_saved_dataset(path, purpose, source, limit)
        else:
            files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and not _hidden(p, path))
            if not files:
                raise UserError(f"{spec}: the folder holds no {', '.join(DATA_SUFFIXES)} files")
            for file in files:
                source.digest.update(str(file.relative_to(path)).encode())
                _read_file(file, source, limit)
    elif path.exists():
        _read_file(path, source, limit)
    elif hub_dataset(spec):
        _read_hub(spec, purpose, source, limit)
    else:
        raise UserError(f"{spec}: no such file or folder (and not a hub dataset id like owner/name:split)")
    return source


def hub_dataset(spec: str) -> str | None:
    """The hub dataset id a data spec names (`owner/name` of `owner/name[:split]`), or None for a local path."""
    if Path(spec).expanduser().exists() or not names_hub_dataset(spec):
        return None
    return spec.partition(":")[0]


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_file(path: Path, source: Source, limit: int) -> None:
    if path.suffix not in DATA_SUFFIXES:
        raise UserError(f"{path}: philora reads {', '.join(DATA_SUFFIXES)} files; convert this one or name another")
    part = Part(str(path))
    try:
        if path.suffix == ".jsonl":  # the one format read a line at a time: its progress can be shown
            megabytes = max(1, round(path.stat().st_size / MEGABYTE))
            with path.open("rb") as file, Phase(f"reading {path.name}", megabytes, "megabyte") as phase:
                _read_json_lines(path, file, part, limit, source.digest, phase)
                phase.update(megabytes - phase.done)
        else:
            raw = path.read_bytes()
            source.digest.update(raw)
    except OSError as e:
        raise UserError(f"{path}: cannot read the data file ({e.strerror or e})") from None
    if path.suffix == ".parquet":
        _read_parquet(path, part, limit)
    elif path.suffix == ".csv":
        _read_csv(path, _decode_whole(path, raw), part, limit)
    elif path.suffix == ".json" and raw.lstrip(BOM + b" \t\r\n").startswith(b"["):
        _read_json_array(path, _decode_whole(path, raw), part, limit)
    elif path.suffix == ".json":  # a .json file that holds JSON lines, already read whole
        _read_json_lines(path, io.BytesIO(raw), part, limit, None)
    if not part.rows:
        raise UserError(f"{path}: the file has no rows")
    source.parts.append(part)


def _decode_whole(path: Path, raw: bytes) -> str:
    try:
        return raw.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 (byte {raw[e.start]:#04x}); save the file as UTF-8") from None


def _read_json_lines(
    path: Path, file: IO[bytes], part: Part, limit: int, digest: Any | None, phase: Phase | None = None
) -> None:
    """One row per line; blank lines are not rows, and a bad line is a bad row, not a bad file. The bytes read go
    into `digest` (None: already counted); `phase` is told the megabytes read."""
    for number, line in _lines(file, limit, digest):
        if phase is not None and number % 1024 == 0:
            phase.update(file.tell() // MEGABYTE - phase.done)
        where = f"{path}:{number}"
        if isinstance(line, int):
            part.rows.append(RawRow(oversized(line, limit), where))
            continue
        if not line.strip():
            continue
        try:
            part.rows.append(RawRow(json.loads(line.decode("utf-8")), where))
        except UnicodeDecodeError as e:
            reason = f"invalid UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1}); save the file as UTF-8"
            part.rows.append(RawRow(BadRow(reason), where))
        except json.JSONDecodeError as e:
            reason = f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
            part.rows.append(RawRow(BadRow(reason), where))


def _lines(file: IO[bytes], limit: int, digest: Any | None) -> Iterator[tuple[int, bytes | int]]:
    """(number, line) for each line of `file` (without its "\n"), or (number, size) for a line over `limit` bytes:
    that one is read past in chunks, never held whole."""
    if (head := file.read(len(BOM))) != BOM:
        file.seek(0)
    elif digest is not None:
        digest.update(head)
    for number in count(1):
        # the limit, a line ending ("\r\n") and one byte more: a line that does not end within it is over the limit
        line = file.readline(limit + 3)
        if not line:
            return
        if digest is not None:
            digest.update(line)
        size = len(line)
        while not line.endswith(b"\n") and size > limit:
            if not (line := file.readline(SKIP_CHUNK)):
                break
            if digest is not None:
                digest.update(line)
            size += len(line)
        size -= len(line) - len(line.rstrip(b"\r\n"))
        yield number, (size if size > limit else line.removesuffix(b"\n"))


def oversized(size: int, limit: int) -> BadRow:
    return BadRow(
        f"a row of {size:,} bytes, over the limit of {limit:,} (data.max_row_bytes; null is the larger of 1 MiB and "
        f"{ROW_BYTES_PER_TOKEN} × max_length), rejected unread; shorten the row, or raise data.max_row_bytes to read it"
    )


def _utf8_size(value: Any) -> int:
    """The bytes of a parsed row's strings (its keys and values, nested), as UTF-8."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(_utf8_size(k) + _utf8_size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_utf8_size(v) for v in value)
    return 0


def _sized(value: Any, size: int, limit: int, where: str) -> RawRow:
    return RawRow(oversized(size, limit) if size > limit else value, where)


def _read_json_array(path: Path, text: str, part: Part, limit: int) -> None:
    """A JSON array of rows; each row keeps the line it starts on."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    line, counted = 1, 0
    while True:
        position = _skip_blank(text, position)
        if position < len(text) and text[position] == "]":
            return
        line += text.count("\n", counted, position)
        counted = position
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); fix the file, or write one "
                "row per line as .jsonl so one bad row does not hide the rest"
            ) from None
        # the array is parsed whole to find where a row ends; its size still keeps it from being tokenised
        part.rows.append(_sized(value, _utf8_size(text[position:end]), limit, f"{path}:{line}"))
        position = _skip_blank(text, end)
        if position < len(text) and text[position] == ",":
            position += 1
        elif position >= len(text) or text[position] != "]":
            line += text.count("\n", counted, position)
            raise UserError(f"{path}:{line}: expected ',' or ']' after a row of the JSON array")


def _skip_blank(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _read_csv(path: Path, text: str, part: Part, limit: int) -> None:
    lines = text.splitlines(keepends=True)
    previous = csv.field_size_limit(sys.maxsize)  # the text is in memory already; a row is measured, then judged
    try:
        reader = csv.DictReader(lines)
        header = reader.fieldnames or []
        part.columns = dict.fromkeys(header, "string")
        start = reader.line_num + 1
        for row in reader:
            value: Any = row
            if None in row:
                value = BadRow(f"more cells than the {len(header)} header columns; quote cells that hold commas")
            elif any(cell is None for cell in row.values()):
                value = BadRow(f"fewer cells than the {len(header)} header columns")
            size = sum(_utf8_size(line) for line in lines[start - 1 : reader.line_num])
            part.rows.append(_sized(value, size, limit, f"{path}:{start}"))
            start = reader.line_num + 1
    finally:
        csv.field_size_limit(previous)


def _read_parquet(path: Path, part: Part, limit: int) -> None:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow; pip install pyarrow") from None
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses for damaged files
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    part.columns = _arrow_kinds(table.schema)
    for i, row in enumerate(table.to_pylist(), start=1):
        part.rows.append(_sized(row, _utf8_size(row), limit, f"{path}: row {i}"))


def _arrow_kinds(schema: Any) -> dict[str, str]:
    import pyarrow as pa

    def kind(t: Any) -> str:
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return "list"
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "string"
        return str(t)

    return {name: kind(t) for name, t in zip(schema.names, schema.types, strict=True)}


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _read_saved_dataset(path: Path, purpose: str, source: Source, limit: int) -> None:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError/ValueError variants for damaged dirs
        raise UserError(f"{path}: not a readable saved dataset ({e})") from None
    name = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        split = _pick_split(name, list(loaded), purpose)
        loaded, name = loaded[split], f"{path}[{split}]"
    _add_dataset(loaded, name, source, limit)


def _pick_split(name: str, splits: list[str], purpose: str) -> str:
    wanted = ("train",) if purpose == "train" else EVAL_SPLITS
    for split in wanted:
        if split in splits:
            return split
    raise UserError(
        f"{name}: no {' or '.join(wanted)} split (it has {', '.join(splits)}); name one as {name}:SPLIT"
        if not Path(name).exists()
        else f"{name}: no {' or '.join(wanted)} split (it has {', '.join(splits)}); save the split you want alone"
    )


def _read_hub(spec: str, purpose: str, source: Source, limit: int) -> None:
    import datasets

    repo, _, split = spec.partition(":")
    try:
        if not split:
            split = _pick_split(spec, list(datasets.get_dataset_split_names(repo)), purpose)
        loaded = datasets.load_dataset(repo, split=split)
    except UserError:
        raise
    except Exception as e:  # offline, missing, gated, bad split: datasets raises many types
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{spec}: cannot load this hub dataset ({message}); check the id and split, your network and "
            "HF_TOKEN, or download it and name the local files"
        ) from None
    _add_dataset(loaded, f"{repo}[{split}]", source, limit)


def _add_dataset(dataset: Any, name: str, source: Source, limit: int) -> None:
    source.digest.update(str(getattr(dataset, "_fingerprint", name)).encode())
    part = Part(name, columns=_arrow_kinds(dataset.features.arrow_schema))
    part.rows = [_sized(row, _utf8_size(row), limit, f"{name}: row {i}") for i, row in enumerate(dataset.to_list(), 1)]
    source.parts.append(part)
