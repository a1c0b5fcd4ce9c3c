"""Where rows come from: .jsonl, .json, .csv, .parquet files, folders of them, saved `datasets` dirs, hub ids.

Every row arrives with the place it came from (`file:line`, or `file: row N` where a format has no lines), so
a problem can always be named where the user can find it. Each file (or dataset split) is a Part, whose format
is detected on its own. Problems with a whole file (missing, unreadable, empty, a JSON array that does not parse)
stop at once as a UserError.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from philora.errors import UserError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")
EVAL_SPLITS = ("validation", "eval", "test")


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


def read_source(spec: str, purpose: str = "train") -> Source:
    """Read a file, a folder, a saved `datasets` dir or a hub id (`owner/name` or `owner/name:split`)."""
    path = Path(spec).expanduser()
    source = Source(spec)
    if path.is_dir():
        if _is_saved_dataset(path):
            _read_saved_dataset(path, purpose, source)
        else:
            files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and not _hidden(p, path))
            if not files:
                raise UserError(f"{spec}: the folder holds no {', '.join(SUFFIXES)} files")
            for file in files:
                source.digest.update(str(file.relative_to(path)).encode())
                _read_file(file, source)
    elif path.exists():
        _read_file(path, source)
    elif hub_dataset(spec):
        _read_hub(spec, purpose, source)
    else:
        raise UserError(f"{spec}: no such file or folder (and not a hub dataset id like owner/name:split)")
    return source


def hub_dataset(spec: str) -> str | None:
    """The hub dataset id a data spec names (`owner/name` of `owner/name[:split]`), or None for a local path."""
    path = Path(spec).expanduser()
    if path.exists() or not HUB_ID.match(spec) or path.suffix in SUFFIXES:
        return None
    return spec.partition(":")[0]


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_file(path: Path, source: Source) -> None:
    if path.suffix not in SUFFIXES:
        raise UserError(f"{path}: philora reads {', '.join(SUFFIXES)} files; convert this one or name another")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the data file ({e.strerror or e})") from None
    source.digest.update(raw)
    part = Part(str(path))
    if path.suffix == ".parquet":
        _read_parquet(path, part)
    elif path.suffix == ".csv":
        _read_csv(path, _decode_whole(path, raw), part)
    elif path.suffix == ".json" and raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        _read_json_array(path, _decode_whole(path, raw), part)
    else:  # .jsonl, and .json files that hold JSON lines
        _read_json_lines(path, raw, part)
    if not part.rows:
        raise UserError(f"{path}: the file has no rows")
    source.parts.append(part)


def _decode_whole(path: Path, raw: bytes) -> str:
    try:
        return raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 (byte {raw[e.start]:#04x}); save the file as UTF-8") from None


def _read_json_lines(path: Path, raw: bytes, part: Part) -> None:
    """One row per line; blank lines are not rows, and a bad line is a bad row, not a bad file."""
    for number, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            part.rows.append(RawRow(json.loads(line.decode("utf-8")), where))
        except UnicodeDecodeError as e:
            reason = f"invalid UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1}); save the file as UTF-8"
            part.rows.append(RawRow(BadRow(reason), where))
        except json.JSONDecodeError as e:
            reason = f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
            part.rows.append(RawRow(BadRow(reason), where))


def _read_json_array(path: Path, text: str, part: Part) -> None:
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
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); fix the file, or write one "
                "row per line as .jsonl so one bad row does not hide the rest"
            ) from None
        part.rows.append(RawRow(value, f"{path}:{line}"))
        position = _skip_blank(text, position)
        if position < len(text) and text[position] == ",":
            position += 1
        elif position >= len(text) or text[position] != "]":
            line += text.count("\n", counted, position)
            raise UserError(f"{path}:{line}: expected ',' or ']' after a row of the JSON array")


def _skip_blank(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _read_csv(path: Path, text: str, part: Part) -> None:
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = reader.fieldnames or []
    part.columns = dict.fromkeys(header, "string")
    start = reader.line_num + 1
    for row in reader:
        value: Any = row
        if None in row:
            value = BadRow(f"more cells than the {len(header)} header columns; quote cells that hold commas")
        elif any(cell is None for cell in row.values()):
            value = BadRow(f"fewer cells than the {len(header)} header columns")
        part.rows.append(RawRow(value, f"{path}:{start}"))
        start = reader.line_num + 1


def _read_parquet(path: Path, part: Part) -> None:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow; pip install pyarrow") from None
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses for damaged files
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    part.columns = _arrow_kinds(table.schema)
    for i, row in enumerate(table.to_pylist(), start=1):
        part.rows.append(RawRow(row, f"{path}: row {i}"))


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


def _read_saved_dataset(path: Path, purpose: str, source: Source) -> None:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError/ValueError variants for damaged dirs
        raise UserError(f"{path}: not a readable saved dataset ({e})") from None
    name = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        split = _pick_split(name, list(loaded), purpose)
        loaded, name = loaded[split], f"{path}[{split}]"
    _add_dataset(loaded, name, source)


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


def _read_hub(spec: str, purpose: str, source: Source) -> None:
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
    _add_dataset(loaded, f"{repo}[{split}]", source)


def _add_dataset(dataset: Any, name: str, source: Source) -> None:
    source.digest.update(str(getattr(dataset, "_fingerprint", name)).encode())
    part = Part(name, columns=_arrow_kinds(dataset.features.arrow_schema))
    part.rows = [RawRow(row, f"{name}: row {i}") for i, row in enumerate(dataset.to_list(), start=1)]
    source.parts.append(part)
