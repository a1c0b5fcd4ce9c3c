"""Length policies, the cache, parallel encoding and the report: every row accounted for, nothing recomputed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from philora import data
from philora.cli import main
from philora.config import DataSection, ModelSection
from philora.data import cache
from philora.data.encode import encode_all
from philora.data.formats import Conversation
from philora.data.render import IGNORE, ChatEncoder
from philora.model.load import load_tokenizer


@pytest.fixture(scope="module")
def encoder(tiny_phi3: Path) -> ChatEncoder:
    return ChatEncoder(load_tokenizer(ModelSection(name_or_path=str(tiny_phi3))))


def chat(turns: int, words: int = 20, system: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": "Be exact."}] if system else []
    for t in range(turns):
        messages += [
            {"role": "user", "content": f"Question {t}: " + "why " * words},
            {"role": "assistant", "content": f"Answer {t}: " + "because " * words},
        ]
    return messages


def trained_text(encoder: ChatEncoder, sample) -> str:
    return encoder.tokenizer.decode(sample.labels[sample.labels != IGNORE])


def fit(encoder: ChatEncoder, messages: list[dict], max_length: int, overlong: str, train_on: str = "assistant"):
    (outcome,) = encode_all([Conversation("x", messages=messages)], encoder, (train_on, max_length, overlong, True), 1)
    return outcome


def test_overlong_drop_truncate_split(encoder: ChatEncoder) -> None:
    messages = chat(4)
    whole = encoder.encode(messages)
    limit = len(whole.input_ids) // 2
    assert fit(encoder, messages, 10_000, "drop").fit == "whole"
    assert fit(encoder, messages, limit, "drop").fit == "dropped"
    assert not fit(encoder, messages, limit, "drop").samples

    truncated = fit(encoder, messages, limit, "truncate")
    (sample,) = truncated.samples
    assert truncated.fit == "truncated" and len(sample.input_ids) <= limit
    assert sample.input_ids.tolist() == whole.input_ids[: len(sample.input_ids)].tolist()
    assert sample.input_ids[-1] == encoder.end_of_turn_id  # cut after a whole answer
    assert trained_text(encoder, sample).count("<|im_end|>") in (1, 2)

    split = fit(encoder, messages, limit, "split")
    assert split.fit == "split" and len(split.samples) >= 2
    assert all(len(s.input_ids) <= limit for s in split.samples)
    texts = [encoder.tokenizer.decode(s.input_ids) for s in split.samples]
    assert all(t.startswith("<|im_start|>system\nBe exact.<|im_end|>") for t in texts)  # system prompt repeated
    answers = "".join(trained_text(encoder, s) for s in split.samples)
    assert answers == "".join(f"Answer {t}: " + "because " * 20 + "<|im_end|>" for t in range(4))


def test_an_overlong_first_answer_is_cut_inside_or_dropped(encoder: ChatEncoder) -> None:
    messages = chat(1, words=200)
    prompt = len(encoder.ids(messages[:2], generation_prompt=True))
    cut = fit(encoder, messages, prompt + 5, "truncate")
    assert cut.fit == "truncated" and cut.samples[0].trained == 5
    assert fit(encoder, messages, prompt - 1, "truncate").fit == "dropped"  # nothing trained would be left
    assert fit(encoder, messages, prompt - 1, "split").fit == "dropped"


def test_split_respects_train_flags_and_last_assistant(encoder: ChatEncoder) -> None:
    messages = chat(4)
    messages[2]["train"] = False
    limit = len(encoder.encode(chat(4)).input_ids) // 3
    pieces = fit(encoder, messages, limit, "split").samples
    answers = "".join(trained_text(encoder, s) for s in pieces)
    assert "Answer 0" not in answers and "Answer 1" in answers
    last = fit(encoder, chat(4), limit, "split", "last_assistant").samples
    assert len(last) == 1 and trained_text(encoder, last[0]).startswith("Answer 3")


def test_parallel_encoding_equals_one_process(encoder: ChatEncoder) -> None:
    rows = [Conversation(f"x:{i}", messages=chat(1 + i % 3, words=3 + i % 7)) for i in range(300)]
    injected = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<|im_end|>"}]
    rows[7] = Conversation("x:7", messages=injected)
    one = encode_all(rows, encoder, ("assistant", 120, "split", True), 1)
    two = encode_all(rows, encoder, ("assistant", 120, "split", True), 2)
    assert [(o.fit, o.problem) for o in one] == [(o.fit, o.problem) for o in two]
    assert [[(s.input_ids.tolist(), s.labels.tolist()) for s in o.samples] for o in one] == [
        [(s.input_ids.tolist(), s.labels.tolist()) for s in o.samples] for o in two
    ]
    assert one[7].fit == "rejected" and "special token" in one[7].problem
    assert {o.fit for o in one} >= {"whole", "split", "rejected"}


def test_second_load_comes_from_the_cache_and_settings_change_the_key(
    tmp_path: Path, encoder: ChatEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"messages": chat(1 + i % 3)} for i in range(20)] + ["{broken"]
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    dc = DataSection(train=str(path), max_length=200, overlong="split")
    first = data.load_source(str(path), "train", dc, encoder)
    assert not first.from_cache and len(first.problems) == 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again despite the cache")

    monkeypatch.setattr(data, "encode_all", no_encoding)
    second = data.load_source(str(path), "train", dc, encoder)
    assert second.from_cache and second.problems == first.problems
    assert [[(s.input_ids.tolist(), s.labels.tolist()) for s in r.outcome.samples] for r in second.records] == [
        [(s.input_ids.tolist(), s.labels.tolist()) for s in r.outcome.samples] for r in first.records
    ]
    assert [r.outcome.fit for r in second.records] == [r.outcome.fit for r in first.records]
    monkeypatch.undo()
    for change in ({"max_length": 300}, {"overlong": "drop"}, {"train_on": "all"}):
        assert not data.load_source(str(path), "train", DataSection(**{**vars(dc), **change}), encoder).from_cache
    path.write_text(path.read_text().replace("Be exact.", "Be exact!"))
    assert not data.load_source(str(path), "train", dc, encoder).from_cache
    assert list((cache.cache_root() / "data").glob("*.tmp")) == []


def test_data_check_reports_lengths_masks_and_a_highlighted_sample(
    tiny_phi3: Path, tmp_path: Path, capsys: pytest.CaptureFixture, encoder: ChatEncoder
) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": chat(1 + i % 4)}) + "\n" for i in range(40)))
    args = ["data", "check", str(path), "--base", str(tiny_phi3), "--set", "data.max_length=200"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"data ← {path}: messages format, 40 rows, 0 rejected" in out
    assert "p50" in out and "p95" in out and "(max_length 200)" in out
    assert "truncated, 0 split, 0 dropped" in out
    assert "one sample, trained tokens inside ⟦ ⟧:" in out
    assert "<|im_start|>assistant\n⟦Answer 0: because" in out and "because <|im_end|>⟧" in out
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 40 and report["rejected"] == 0 and report["format"] == "messages"
    overlong = sum(len(encoder.encode(chat(1 + i % 4)).input_ids) > 200 for i in range(40))
    assert report["truncated"] == overlong > 0
    assert report["length"]["max"] <= 200 and sum(c for _, _, c in report["histogram"]) == report["samples"]
    assert 0 < report["trained_fraction"] < 1
    assert any(part["trained"] for part in report["sample"]) and any(not p["trained"] for p in report["sample"])
