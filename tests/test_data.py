"""Data: bad rows named by file:line, labels exactly on assistant tokens, packing that changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from philora import data
from philora.config import DataSection, ModelSection
from philora.data.batching import collate, one_per_row, pack
from philora.data.readers import read_jsonl
from philora.data.render import IGNORE, ChatEncoder
from philora.errors import UserError
from philora.loss import TokenLoss
from philora.model import load_model, load_tokenizer

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture(scope="module")
def tokenizer(tiny_phi3: Path):
    return load_tokenizer(ModelSection(name_or_path=str(tiny_phi3)))


def write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"text": "x"}, "no 'messages' key"),
        ({"messages": []}, "non-empty list"),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role is 'robot'; use one of system, user",
        ),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content is a int"),
        ({"messages": [{"role": "user"}]}, "messages[0].content is missing"),
        ({"messages": [{"role": "user", "content": " "}]}, "messages[0].content is empty"),
        ({"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
        (
            {"messages": [{"role": "assistant", "content": "a"}]},
            "first non-system message must be from the user",
        ),
        (
            {"messages": [GOOD["messages"][0], GOOD["messages"][0], GOOD["messages"][1]]},
            "two user messages in a row",
        ),
    ],
)
def test_bad_rows_are_named_by_file_and_line(tmp_path: Path, row: object, expected: str) -> None:
    path = write(tmp_path / "d.jsonl", [GOOD, "", row])
    result = read_jsonl(path)
    assert len(result.conversations) == 1
    assert len(result.problems) == 1 and result.problems[0].startswith(f"{path}:3: ")
    assert expected in result.problems[0]


def test_invalid_utf8_bom_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xff"}\n')
    result = read_jsonl(path)
    assert len(result.conversations) == 1 and "invalid UTF-8" in result.problems[0] and ":2:" in result.problems[0]
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="the file has no rows"):
        read_jsonl(tmp_path / "e.jsonl")


def test_bad_rows_stop_the_run_or_are_counted(tmp_path: Path, tokenizer) -> None:
    path = write(tmp_path / "d.jsonl", [GOOD] * 3 + ["oops"] * 12)
    with pytest.raises(UserError) as e:
        data.prepare(DataSection(train=str(path)), tokenizer, seed=0)
    assert len(e.value.problems) == 11  # the first 10, then the total
    assert "12 bad rows in all (2 more not listed)" in e.value.problems[-1]
    prepared = data.prepare(DataSection(train=str(path), on_bad_row="skip"), tokenizer, seed=0)
    assert len(prepared.train.samples) == 3 and len(prepared.skipped) == 12


def test_labels_cover_exactly_the_answers_and_end_of_turn(tokenizer) -> None:
    encoder = ChatEncoder(tokenizer)
    assert tokenizer.convert_ids_to_tokens(encoder.end_of_turn_id) == "<|im_end|>"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "Second answer"},
    ]
    sample = encoder.encode(messages)
    trained = [i for i, label in enumerate(sample.labels) if label != IGNORE]
    text = tokenizer.decode([sample.input_ids[i] for i in trained])
    assert text == "First answer<|im_end|>Second answer<|im_end|>"
    last = encoder.encode(messages, "last_assistant")
    assert tokenizer.decode([t for t in last.labels if t != IGNORE]) == "Second answer<|im_end|>"
    everything = encoder.encode(messages, "all")
    assert everything.labels[1:] == everything.input_ids[1:] and everything.labels[0] == IGNORE
    skip_first = [dict(m) for m in messages]
    skip_first[2]["train"] = False
    assert tokenizer.decode([t for t in encoder.encode(skip_first).labels if t != IGNORE]) == "Second answer<|im_end|>"


def test_pad_is_not_the_end_of_turn_token(tokenizer) -> None:
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_best_fit_packing_fills_rows() -> None:
    lengths = [60, 50, 40, 30, 20, 10, 90]
    rows = pack(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) == 3  # 300 tokens in three full rows


def test_packed_batch_gives_the_same_per_token_loss(tiny_phi3: Path, tokenizer) -> None:
    torch.manual_seed(0)
    model = load_model(ModelSection(name_or_path=str(tiny_phi3), dtype="float32"), training=True)
    encoder = ChatEncoder(tokenizer)
    samples = [
        encoder.encode(
            [
                {"role": "user", "content": f"Question {i} " * (i + 1)},
                {"role": "assistant", "content": f"Answer number {i}. " * (3 - i % 3)},
            ]
        )
        for i in range(6)
    ]
    loss_fn = TokenLoss(model).eval()
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        alone = [loss_fn(**collate(samples, [[i]], pad)) for i in range(len(samples))]
        packed = loss_fn(**collate(samples, pack([len(s.input_ids) for s in samples], 128), pad))
        padded = loss_fn(**collate(samples, one_per_row(len(samples)), pad))
    total = sum(loss for loss, _ in alone)
    count = sum(int(n) for _, n in alone)
    assert int(packed[1]) == int(padded[1]) == count
    torch.testing.assert_close(packed[0], total, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(padded[0], total, rtol=1e-5, atol=1e-4)


def test_selective_head_loss_equals_the_models_own_loss(tiny_phi3: Path, tokenizer) -> None:
    model = load_model(ModelSection(name_or_path=str(tiny_phi3), dtype="float32"), training=True).eval()
    sample = ChatEncoder(tokenizer).encode(GOOD["messages"])
    batch = collate([sample], [[0]], tokenizer.pad_token_id)
    with torch.no_grad():
        ours, n = TokenLoss(model)(**batch)
        reference = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours / n, reference, rtol=1e-6, atol=1e-6)


def test_sample_dataset_is_generated_varied_and_held_out() -> None:
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(root / "scripts/make_sample_data.py"), "--check"], check=True)
    train, evals = (read_jsonl(data.SAMPLE_DIR / f"{name}.jsonl") for name in ("train", "eval"))
    assert not train.problems and not evals.problems
    rows = train.conversations
    assert len(rows) >= 300
    assert sum(c.messages[0]["role"] == "system" for c in rows) >= 50
    assert sum(sum(m["role"] == "assistant" for m in c.messages) > 1 for c in rows) >= 50

    def people(conversations: list) -> set[str]:
        return {json.loads(m["content"])["name"] for c in conversations for m in c.messages if m["role"] == "assistant"}

    assert not people(rows) & people(evals.conversations)
    assert not {json.dumps(c.messages) for c in rows} & {json.dumps(c.messages) for c in evals.conversations}
