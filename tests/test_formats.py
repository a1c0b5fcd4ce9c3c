"""Every format from every kind of source becomes the same conversations, with rows named where they came from."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from philora import data
from philora.config import DataSection, ModelSection
from philora.data.render import IGNORE, ChatEncoder
from philora.errors import UserError
from philora.model.load import load_tokenizer

EXPECTED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]


@pytest.fixture(scope="module")
def encoder(tiny_phi3: Path) -> ChatEncoder:
    return ChatEncoder(load_tokenizer(ModelSection(name_or_path=str(tiny_phi3))))


def load(spec: Path | str, encoder: ChatEncoder, **settings) -> data.SourceData:
    return data.load_source(str(spec), "train", DataSection(**settings), encoder)


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = {
    "messages": {"messages": EXPECTED},
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Name a colour."},
            {"from": "gpt", "value": "Blue."},
        ]
    },
    "alpaca": {"instruction": "Name a colour.", "input": "", "output": "Blue.", "system": "Be brief."},
    "prompt_completion": {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        "completion": [{"role": "assistant", "content": "Blue."}],
    },
}


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_each_chat_format_is_detected_and_converted(fmt: str, tmp_path: Path, encoder: ChatEncoder) -> None:
    path = jsonl(tmp_path / "d.jsonl", [ROWS[fmt], ROWS[fmt]])
    source = load(path, encoder)
    assert source.format == fmt and source.rows == 2 and not source.problems
    assert [r.conversation.messages for r in source.records] == [EXPECTED, EXPECTED]
    assert [r.conversation.source for r in source.records] == [f"{path}:1", f"{path}:2"]
    explicit = load(path, encoder, format=fmt)
    assert (
        explicit.records[0].outcome.samples[0].input_ids.tolist()
        == source.records[0].outcome.samples[0].input_ids.tolist()
    )


def test_alpaca_input_and_history_and_string_prompt_completion(tmp_path: Path, encoder: ChatEncoder) -> None:
    row = {"instruction": "Translate.", "input": "chat", "output": "cat", "history": [["Hi", "Hello"]]}
    source = load(jsonl(tmp_path / "a.jsonl", [row]), encoder)
    assert source.records[0].conversation.messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Translate.\n\nchat"},
        {"role": "assistant", "content": "cat"},
    ]
    source = load(jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "completion": "4"}]), encoder)
    assert source.records[0].conversation.messages == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_prompt_completion_trains_only_the_completion(tmp_path: Path, encoder: ChatEncoder) -> None:
    row = {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Earlier answer"},
            {"role": "user", "content": "Again?"},
        ],
        "completion": [{"role": "assistant", "content": "Final answer"}],
    }
    sample = load(jsonl(tmp_path / "p.jsonl", [row]), encoder).records[0].outcome.samples[0]
    trained = encoder.tokenizer.decode(sample.labels[sample.labels != IGNORE])
    assert trained == "Final answer<|im_end|>"


def test_text_format(tmp_path: Path, encoder: ChatEncoder) -> None:
    source = load(jsonl(tmp_path / "t.jsonl", [{"text": "Plain prose, trained everywhere."}]), encoder)
    assert source.format == "text"
    sample = source.records[0].outcome.samples[0]
    assert sample.labels[1:].tolist() == sample.input_ids[1:].tolist() and sample.labels[0] == IGNORE
    assert sample.input_ids[-1] == encoder.tokenizer.eos_token_id


def test_column_mapping(tmp_path: Path, encoder: ChatEncoder) -> None:
    path = jsonl(tmp_path / "q.jsonl", [{"question": "Name a colour.", "answer": "Blue."}])
    source = load(path, encoder, columns={"prompt": "question", "completion": "answer"})
    assert source.format == "prompt_completion"
    chat = [{"speaker": "user", "text": "Name a colour."}, {"speaker": "assistant", "text": "Blue."}]
    path = jsonl(tmp_path / "m.jsonl", [{"dialog": chat}])
    source = load(path, encoder, columns={"messages": "dialog", "role": "speaker", "content": "text"})
    assert source.records[0].conversation.messages == EXPECTED[1:]
    with pytest.raises(UserError, match=r"data.columns: unknown field 'answer'"):
        load(path, encoder, columns={"answer": "x"})


def test_json_array_keeps_line_numbers(tmp_path: Path, encoder: ChatEncoder) -> None:
    path = tmp_path / "a.json"
    path.write_text("[\n" + ",\n".join(json.dumps(ROWS["messages"], indent=1) for _ in range(2)) + "\n]\n")
    source = load(path, encoder)
    first_lines = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line == "{"]
    assert [r.conversation.source for r in source.records] == [f"{path}:{n}" for n in first_lines]
    lines = tmp_path / "lines.json"  # .json files that hold JSON lines are read as such
    jsonl(lines, [ROWS["messages"]])
    assert load(lines, encoder).rows == 1


def test_csv(tmp_path: Path, encoder: ChatEncoder) -> None:
    path = tmp_path / "a.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "input", "output", "system"])
        writer.writerow(["Name a colour.", "", "Blue.", "Be brief."])
        writer.writerow(["Multi\nline", "", "ok", ""])
        writer.writerow(["Third", "", "row", ""])
    source = load(path, encoder)
    assert source.format == "alpaca"
    assert source.records[0].conversation.messages == EXPECTED
    assert [r.conversation.source for r in source.records] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    messages = tmp_path / "m.csv"
    with messages.open("w", newline="") as f:
        csv.writer(f).writerows([["messages"], [json.dumps(EXPECTED)]])
    assert load(messages, encoder).records[0].conversation.messages == EXPECTED


def test_parquet(tmp_path: Path, encoder: ChatEncoder) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([ROWS["messages"], ROWS["messages"]]), path)
    source = load(path, encoder)
    assert source.format == "messages" and [r.conversation.source for r in source.records][1] == f"{path}: row 2"
    assert source.records[0].conversation.messages == EXPECTED


def test_folder_of_files(tmp_path: Path, encoder: ChatEncoder) -> None:
    folder = tmp_path / "data"
    (folder / "more").mkdir(parents=True)
    jsonl(folder / "a.jsonl", [ROWS["messages"]])
    jsonl(folder / "more" / "b.jsonl", [ROWS["messages"]] * 2)
    (folder / "c.csv").write_text("instruction,output,system\nName a colour.,Blue.,Be brief.\n")
    (folder / ".hidden.jsonl").write_text("not read\n")
    (folder / "notes.txt").write_text("not read either\n")
    source = load(folder, encoder)
    assert source.rows == 4 and source.format == "messages+alpaca"  # each file's format is its own
    assert [r.conversation.messages for r in source.records] == [EXPECTED] * 4
    assert [r.conversation.source for r in source.records][-1] == f"{folder / 'more' / 'b.jsonl'}:2"


def test_saved_datasets_dir(tmp_path: Path, encoder: ChatEncoder) -> None:
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([ROWS["sharegpt"]] * 3),
            "validation": datasets.Dataset.from_list([ROWS["sharegpt"]]),
        }
    ).save_to_disk(saved)
    train = load(saved, encoder)
    assert train.format == "sharegpt" and train.rows == 3
    assert train.records[0].conversation.source == f"{saved}[train]: row 1"
    held_out = data.load_source(str(saved), "eval", DataSection(), encoder)
    assert held_out.rows == 1 and held_out.records[0].conversation.messages == EXPECTED


def test_hub_dataset_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, encoder: ChatEncoder) -> None:
    """The hub path calls datasets' real loader; offline it says what to do, and rows are named by split."""
    import datasets
    import huggingface_hub

    # Both libraries read the offline switch when imported; set theirs directly (no network in tests).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    with pytest.raises(UserError, match=r"someone/chats:train: cannot load this hub dataset \(.*\); check the id"):
        load("someone/chats:train", encoder)

    calls = []

    def fake_load(repo: str, split: str) -> datasets.Dataset:
        calls.append((repo, split))
        return datasets.Dataset.from_list([ROWS["messages"]])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda repo: ["train", "test"])
    source = load("someone/chats", encoder)
    assert calls == [("someone/chats", "train")]
    assert source.records[0].conversation.source == "someone/chats[train]: row 1"
    data.load_source("someone/chats", "eval", DataSection(), encoder)
    assert calls[-1] == ("someone/chats", "test")


def test_detection_failure_names_the_keys_and_the_fix(tmp_path: Path, encoder: ChatEncoder) -> None:
    path = jsonl(tmp_path / "d.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(UserError, match=rf"{path}:1: cannot tell the data format from this row's keys \(a, q\)"):
        load(path, encoder)


def test_a_mapping_to_a_missing_column_names_the_mapping(tmp_path: Path, encoder: ChatEncoder) -> None:
    """A typo in data.columns is said as such, with the file's columns in their order, whether the format is detected
    or given, in a table or in JSON lines; a mapping the file's format does not read is not checked."""
    table = tmp_path / "qa.csv"
    table.write_text("question,answer\nName a colour.,Blue.\n")
    lines = jsonl(tmp_path / "qa.jsonl", [{"question": "Name a colour.", "answer": "Blue."}])
    for path, fmt in ((table, "auto"), (table, "prompt_completion"), (lines, "auto"), (lines, "prompt_completion")):
        expected = f"data.columns.prompt: there is no column 'questions' in {path}; its columns are: question, answer"
        with pytest.raises(UserError) as raised:
            load(path, encoder, format=fmt, columns={"prompt": "questions", "completion": "answer"})
        assert raised.value.problems == [expected]
    mapped = {"prompt": "question", "completion": "answer", "system": "sys", "instruction": "task"}
    with pytest.raises(UserError, match=r"^data.columns.system: there is no column 'sys' in .*qa.csv"):
        load(table, encoder, format="alpaca", columns=mapped | {"output": "answer", "instruction": "question"})
    assert load(table, encoder, columns=mapped).format == "prompt_completion"  # system, instruction: not read here


def test_lists_in_messages_keep_one_order() -> None:
    """Lists of valid names come in declaration order, not the hash order of a set, so a message is the same on
    every run (PYTHONHASHSEED differs between processes)."""
    code = (
        "from philora.data.formats import Columns\n"
        "from philora.config import load_config\n"
        "from philora.errors import UserError\n"
        "for attempt in (lambda: Columns({'answer': 'x'}), lambda: load_config(None, ['data.zzz=x'])):\n"
        "    try:\n"
        "        attempt()\n"
        "    except UserError as e:\n"
        "        print(e.problems)\n"
    )

    def run(seed: str) -> str:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout

    runs = {run(seed) for seed in ("1", "2", "3")}
    assert len(runs) == 1
    assert "map any of messages, conversations, instruction, output, prompt" in (printed := runs.pop())
    assert "data.zzz: unknown key; known keys: train, eval, format, columns" in printed
