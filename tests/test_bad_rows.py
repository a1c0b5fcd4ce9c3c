"""A corpus of bad data: each kind gets its own one-line message naming the file and line, and exit status 2."""

from __future__ import annotations

import json
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
