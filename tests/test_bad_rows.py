"""A corpus of bad data: each kind gets its own one-line message naming the file and line, and exit status 2."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from philora.cli import main

CORPUS = Path(__file__).resolve().parent / "bad_rows"
EXPECTED: dict[str, list] = json.loads((CORPUS / "expected.json").read_text())


def check(path: Path, model: Path, *extra: str) -> tuple[int, str, str]:
    return main(["data", "check", str(path), "--model", str(model), *extra])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_kind_of_bad_row_is_named_with_its_line(
    name: str, tiny_phi3: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    line, fragment, *extra = EXPECTED[name]
    path = tmp_path / name
    shutil.copy(CORPUS / name, path)
    status = check(path, tiny_phi3, *(extra[0] if extra else []))
    err = capsys.readouterr().err
    assert status == 2, err
    errors = [e for e in err.splitlines() if e.startswith("philora: error: ")]
    where = f"{path}:{line}: " if line else f"{path}: "
    assert any(e.startswith(f"philora: error: {where}") and fragment in e for e in errors), err
    assert "Traceback" not in err


def test_the_corpus_has_twenty_kinds_or_more() -> None:
    assert len(EXPECTED) >= 20
    assert sorted(p.name for p in CORPUS.iterdir() if p.name != "expected.json") == sorted(EXPECTED)


def test_parquet_with_a_wrong_schema(tiny_phi3: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"messages": [1, 2], "id": [3, 4]}), path)
    assert check(path, tiny_phi3) == 2
    err = capsys.readouterr().err
    assert f"philora: error: {path}: column 'messages' holds int64; the messages format needs a list of messages" in err
    pq.write_table(pa.table({"prompt": ["a"], "answer": ["b"]}), path)
    assert check(path, tiny_phi3, "--set", "data.format=prompt_completion") == 2
    assert "no column 'completion' (columns: answer, prompt)" in capsys.readouterr().err


def test_missing_and_unreadable_paths(tiny_phi3: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert check(tmp_path / "nope.jsonl", tiny_phi3) == 2
    assert f"{tmp_path / 'nope.jsonl'}: no such file or folder" in capsys.readouterr().err
    link = tmp_path / "dangling.jsonl"
    link.symlink_to(tmp_path / "gone.jsonl")
    assert check(link, tiny_phi3) == 2
    assert "no such file or folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check(empty, tiny_phi3) == 2
    assert "the folder holds no .jsonl, .json, .csv, .parquet files" in capsys.readouterr().err


def test_a_bom_is_not_a_problem(tiny_phi3: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n")
    assert check(path, tiny_phi3) == 0
    assert "1 rows, 0 rejected" in capsys.readouterr().out


def test_all_bad_rows_are_counted_and_the_first_ten_listed(
    tiny_phi3: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join([json.dumps(good)] + ["{bad"] * 25) + "\n")
    assert check(path, tiny_phi3, "--json") == 2
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["rows"] == 26 and report["rejected"] == 25 and len(report["problems"]) == 25
    errors = [e for e in err.splitlines() if e.startswith("philora: error: ")]
    assert len(errors) == 11 and "25 bad rows in all (15 more not listed)" in errors[-1]


GOOD = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


def test_a_row_over_the_size_limit_is_rejected_by_its_size_unparsed(
    tiny_phi3: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from philora import data
    from philora.config import DataSection, ModelSection
    from philora.data import report
    from philora.model.load import load_tokenizer

    path = tmp_path / "big.jsonl"
    big = '{"messages": "' + "x" * 600  # not even JSON: a parse would say so, the size check says it first
    path.write_text("\n".join([json.dumps(GOOD), big, json.dumps(GOOD)]) + "\n")
    assert check(path, tiny_phi3, "--set", "data.max_row_bytes=512") == 2
    errors = [e for e in capsys.readouterr().err.splitlines() if e.startswith("philora: error: ")]
    assert errors[0] == (
        f"philora: error: {path}:2: a row of 614 bytes, over the limit of 512 (data.max_row_bytes; null is the "
        "larger of 1 MiB and 256 × max_length), rejected unread; shorten the row, or raise data.max_row_bytes to "
        "read it"
    )
    assert "1 bad row in all; fix them, or set data.on_bad_row: skip" in errors[1]

    dc = DataSection(train=str(path), max_row_bytes=512, on_bad_row="skip")
    prepared = data.prepare(dc, load_tokenizer(ModelSection(name_or_path=str(tiny_phi3))), seed=0)
    data.require_usable(prepared, dc)  # skipped, not an error
    assert prepared.sources[0].rows == 3 and len(prepared.train.conversations) == 2
    assert prepared.problems == [f"{path}:2: {errors[0].split(':2: ', 1)[1]}"]
    assert f"skipped 1 bad rows (data.on_bad_row: skip); the first: {path}:2: a row of 614 bytes" in "\n".join(
        report.describe(prepared, dc)
    )


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_every_kind_of_file_measures_its_rows(suffix: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from philora.data.sources import BadRow, read_source

    # 200,000 characters: past the csv module's default field limit (131,072), which used to stop the read
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "é" * 100_000}]
    path = tmp_path / f"rows{suffix}"
    if suffix == ".csv":
        path.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    assert [r.value for r in read_source(str(path), "train", 10**6).rows] == rows
    first, second = read_source(str(path), "train", 100_000).rows
    assert first.value == rows[0] and isinstance(second.value, BadRow)
    # its UTF-8 text (é is 2 bytes), with what the file holds around it: JSON punctuation, a comma, the keys
    assert re.match(r"a row of 200,0\d\d bytes, over the limit of 100,000", second.value.reason), second.value.reason
    assert second.where == {".csv": f"{path}:3", ".json": f"{path}:1", ".parquet": f"{path}: row 2"}[suffix]


def test_the_default_row_limit_refuses_a_huge_row_and_keeps_a_long_one(tiny_phi3: Path, tmp_path: Path) -> None:
    """null is 1 MiB or 256 × max_length: a conversation several times max_length (overlong: split makes samples of
    it) is read, a row of megabytes is refused by its size."""
    from philora import data
    from philora.config import DataSection, ModelSection
    from philora.model.load import load_tokenizer

    assert data.row_limit(DataSection(max_length=2048)) == 1 << 20
    assert data.row_limit(DataSection(max_length=16384)) == 256 * 16384
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "w1 " * 20_000}]}
    huge = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "w2 " * 400_000}]}
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (GOOD, long, huge)) + "\n")
    dc = DataSection(train=str(path), max_length=256, on_bad_row="skip", overlong="split")
    prepared = data.prepare(dc, load_tokenizer(ModelSection(name_or_path=str(tiny_phi3))), seed=0)
    assert len(prepared.train.conversations) == 2
    assert prepared.problems == [
        f"{path}:3: a row of 1,200,{len(json.dumps(huge)) - 1_200_000:03d} bytes, over the limit of 1,048,576 "
        "(data.max_row_bytes; null is the larger of 1 MiB and 256 × max_length), rejected unread; shorten the row, "
        "or raise data.max_row_bytes to read it"
    ]
