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
from philora.data import report as data_report
from philora.data.batching import collate, one_per_row, pack
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


def test_bad_rows_stop_the_run_or_are_counted(tmp_path: Path, tokenizer) -> None:
    path = write(tmp_path / "d.jsonl", [GOOD] * 3 + ["oops"] * 12)
    prepared = data.prepare(DataSection(train=str(path)), tokenizer, seed=0)
    with pytest.raises(UserError) as e:
        data.require_usable(prepared, DataSection(train=str(path)))
    assert len(e.value.problems) == 11  # the first 10, then the total
    assert e.value.problems[0].startswith(f"{path}:4: not valid JSON")
    assert "12 bad rows in all (2 more not listed)" in e.value.problems[-1]
    skip = DataSection(train=str(path), on_bad_row="skip")
    prepared = data.prepare(skip, tokenizer, seed=0)
    data.require_usable(prepared, skip)
    assert len(prepared.train.samples) == 3 and len(prepared.problems) == 12
    report = "\n".join(data_report.describe(prepared, skip))
    assert f"skipped 12 bad rows (data.on_bad_row: skip); the first: {path}:4: not valid JSON" in report


def test_pad_is_not_the_end_of_turn_token(tokenizer) -> None:
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_best_fit_packing_fills_rows() -> None:
    lengths = [60, 50, 40, 30, 20, 10, 90]
    rows = pack(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) == 3  # 300 tokens in three full rows


def token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every trained token, row by row, from the model's full logits."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    return torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none")


def test_packed_batch_gives_the_same_per_token_loss(tiny_phi3: Path, tokenizer) -> None:
    torch.manual_seed(0)
    model = load_model(ModelSection(name_or_path=str(tiny_phi3), dtype="float32"), training=True).eval()
    encoder = ChatEncoder(tokenizer)
    samples = [
        encoder.encode(
            [
                {"role": "user", "content": f"Question {i} " * (i + 1)},
                {"role": "assistant", "content": f"Answer number {i}. " * (3 - i % 3)},
                {"role": "user", "content": "And then?"},
                {"role": "assistant", "content": "Done." * (i % 2 + 1)},
            ][: 2 + 2 * (i % 2)]
        )
        for i in range(6)
    ]
    pad = tokenizer.pad_token_id
    rows = pack([len(s.input_ids) for s in samples], 160)
    assert any(len(row) > 1 for row in rows)
    with torch.no_grad():
        alone = [token_losses(model, collate(samples, [[i]], pad)) for i in range(len(samples))]
        packed = token_losses(model, collate(samples, rows, pad))
        padded = token_losses(model, collate(samples, one_per_row(len(samples)), pad))
        summed, count = TokenLoss(model)(**collate(samples, rows, pad))
    in_row_order = torch.cat([alone[i] for row in rows for i in row])
    torch.testing.assert_close(packed, in_row_order, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded, torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert int(count) == len(in_row_order)
    torch.testing.assert_close(summed, in_row_order.sum(), rtol=1e-5, atol=1e-4)


def test_selective_head_loss_equals_the_models_own_loss(tiny_phi3: Path, tokenizer) -> None:
    model = load_model(ModelSection(name_or_path=str(tiny_phi3), dtype="float32"), training=True).eval()
    sample = ChatEncoder(tokenizer).encode(GOOD["messages"])
    batch = collate([sample], [[0]], tokenizer.pad_token_id)
    with torch.no_grad():
        ours, n = TokenLoss(model)(**batch)
        reference = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours / n, reference, rtol=1e-6, atol=1e-6)
    # With the head frozen, as under LoRA, the chunked head loss runs: the same value and decoder gradients.
    grads = []
    for freeze in (False, True):
        model.zero_grad()
        model.lm_head.weight.requires_grad_(not freeze)
        loss_fn = TokenLoss(model)
        assert loss_fn.chunked == freeze
        summed, _ = loss_fn(**batch)
        summed.backward()
        torch.testing.assert_close(summed / n, reference, rtol=1e-6, atol=1e-6)
        grads.append(model.model.layers[0].mlp.down_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_sample_dataset_is_generated_varied_and_held_out(tokenizer) -> None:
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(root / "scripts/make_sample_data.py"), "--check"], check=True)
    dc = DataSection()
    encoder = ChatEncoder(tokenizer)
    train, evals = (data.load_source(str(data.SAMPLE_DIR / f"{n}.jsonl"), n, dc, encoder) for n in ("train", "eval"))
    assert not train.problems and not evals.problems
    rows = [r.conversation for r in train.records]
    assert len(rows) >= 300
    assert sum(c.messages[0]["role"] == "system" for c in rows) >= 50
    assert sum(sum(m["role"] == "assistant" for m in c.messages) > 1 for c in rows) >= 50

    def people(conversations: list) -> set[str]:
        return {json.loads(m["content"])["name"] for c in conversations for m in c.messages if m["role"] == "assistant"}

    held_out = [r.conversation for r in evals.records]
    assert not people(rows) & people(held_out)
    assert not {json.dumps(c.messages) for c in rows} & {json.dumps(c.messages) for c in held_out}


def test_chunked_head_loss_equals_full_cross_entropy_in_value_and_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    from philora import loss

    monkeypatch.setattr(loss, "CHUNK", 96)  # several chunks and a short last one
    torch.manual_seed(0)
    hidden = torch.randn(250, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 16, dtype=torch.float64)
    targets = torch.randint(0, 300, (250,))
    full = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    chunked = loss.ChunkedHeadLoss.apply(hidden, weight, targets)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-12)
    (expected,) = torch.autograd.grad(full * 0.37, hidden)
    (got,) = torch.autograd.grad(chunked * 0.37, hidden)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    with torch.no_grad():  # eval: no gradient is computed or kept
        assert loss.ChunkedHeadLoss.apply(hidden, weight, targets).item() == pytest.approx(full.item(), rel=1e-12)
