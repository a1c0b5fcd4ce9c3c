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
from philora.model.load import load_model, load_tokenizer
from philora.model.loss import TokenLoss

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


def per_token_losses(model, samples, rows, pad) -> tuple[torch.Tensor, ...]:
    """Each sample's token losses alone, in `rows` packed, in one row each (padded), TokenLoss's sum, and the
    number of trained tokens the batch carries."""
    with torch.no_grad():
        alone = [token_losses(model, collate(samples, [[i]], pad)).float() for i in range(len(samples))]
        packed = token_losses(model, collate(samples, rows, pad)).float()
        padded = token_losses(model, collate(samples, one_per_row(len(samples)), pad)).float()
        batch = collate(samples, rows, pad)
        summed, _ = TokenLoss(model)(**batch)
        count = (batch["labels"][:, 1:] != IGNORE).sum()
    in_row_order = torch.cat([alone[i] for row in rows for i in row])
    return in_row_order, torch.cat(alone), packed, padded, summed, count


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_batch_gives_the_same_per_token_loss(tiny_phi3: Path, tokenizer, dtype: str) -> None:
    torch.manual_seed(0)
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
    models = {d: load_model(ModelSection(name_or_path=str(tiny_phi3), dtype=d), training=True).eval()
              for d in {"float32", dtype}}  # fmt: skip
    in_row_order, alone, packed, padded, summed, count = per_token_losses(models[dtype], samples, rows, pad)
    if dtype == "float32":
        tolerance = 1e-5  # fp32 rounding of other matrix shapes: a few ulps of values near 10
    else:
        # bf16 keeps 8 significant bits: each of these losses is off its exact value by the dtype's rounding, which
        # the fp32 model measures on these very tokens. Packing may move a loss by that much again, no more.
        exact = per_token_losses(models["float32"], samples, rows, pad)[1]
        tolerance = 2 * float((alone - exact).abs().max())
        assert 0 < tolerance < 0.5
    torch.testing.assert_close(packed, in_row_order, rtol=0, atol=tolerance)
    torch.testing.assert_close(padded, alone, rtol=0, atol=tolerance)
    assert int(count) == len(in_row_order)
    # a sum of per-token losses, each within the tolerance: at worst the tolerance times their number
    torch.testing.assert_close(summed.float(), in_row_order.sum(), rtol=0, atol=tolerance * len(in_row_order))


def test_selective_head_loss_equals_the_models_own_loss(tiny_phi3: Path, tokenizer) -> None:
    model = load_model(ModelSection(name_or_path=str(tiny_phi3), dtype="float32"), training=True).eval()
    sample = ChatEncoder(tokenizer).encode(GOOD["messages"])
    batch = collate([sample], [[0]], tokenizer.pad_token_id)
    with torch.no_grad():
        ours, _ = TokenLoss(model)(**batch)
        n = sample.trained
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


def test_chunked_token_logprobs_equal_log_softmax_in_value_and_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    from philora.model import loss

    monkeypatch.setattr(loss, "CHUNK", 96)  # several chunks and a short last one
    torch.manual_seed(0)
    hidden = torch.randn(250, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 16, dtype=torch.float64)
    targets = torch.randint(0, 300, (250,))
    full = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    chunked = loss.ChunkedTokenLogprobs.apply(hidden, weight, targets)
    assert torch.allclose(chunked, full, rtol=1e-12, atol=0)
    # a sum (cross-entropy) and per-position weights (what a preference loss puts on them) alike
    for weights in (torch.full((250,), -0.37, dtype=torch.float64), torch.randn(250, dtype=torch.float64)):
        (expected,) = torch.autograd.grad((full * weights).sum(), hidden, retain_graph=True)
        (got,) = torch.autograd.grad((loss.ChunkedTokenLogprobs.apply(hidden, weight, targets) * weights).sum(), hidden)
        assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    with torch.no_grad():  # eval: no gradient is computed or kept
        assert torch.allclose(loss.ChunkedTokenLogprobs.apply(hidden, weight, targets), full, rtol=1e-12, atol=0)


def longrope_phi3(boundary: int = 32) -> torch.nn.Module:
    """A tiny random Phi-3 with longrope scaling, as Phi-3-mini-128k / Phi-3.5-mini / Phi-4-mini have it."""
    from transformers import Phi3Config, Phi3ForCausalLM

    head_dim = 8
    config = Phi3Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8 * boundary, original_max_position_embeddings=boundary,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * (head_dim // 2),
                         "long_factor": [1.0, 3.0, 9.0, 27.0], "original_max_position_embeddings": boundary},
        pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3,  # weights large enough to matter
    )  # fmt: skip
    # As philora loads models for training: sdpa, no KV cache (packed rows then get block-diagonal attention).
    config._attn_implementation, config.use_cache = "sdpa", False
    torch.manual_seed(0)
    return Phi3ForCausalLM(config).eval()


def random_sample(length: int, seed: int) -> data.Sample:
    ids = torch.randint(3, 300, (length,), generator=torch.Generator().manual_seed(seed)).numpy().astype("int32")
    labels = ids.copy()
    labels[0] = IGNORE  # as in real data: a sample's first token is never an answer
    return data.Sample(ids, labels)


def test_longrope_short_samples_never_share_a_batch_with_long_ones() -> None:
    from philora.config import TrainingSection
    from philora.eval.runner import eval_loss
    from philora.model.load import longrope_boundary
    from philora.train.plan import make_plan

    model = longrope_phi3(boundary=32)
    assert longrope_boundary(model.config) == 32
    short = [random_sample(n, seed) for seed, n in enumerate((20, 31, 32, 12, 25, 17))]
    long = [random_sample(n, 10 + seed) for seed, n in enumerate((33, 70, 50))]
    samples = short + long
    pad = 0
    with torch.no_grad():
        alone = [token_losses(model, collate(samples, [[i]], pad)) for i in range(len(samples))]
        # The fault this guards against: beside a long sample, a short one is computed with the long factors.
        mixed = token_losses(model, collate(samples, [[0, 6]], pad))
        assert not torch.allclose(mixed[: len(alone[0])], alone[0], atol=1e-2)

        lengths = [len(s.input_ids) for s in samples]
        plan = make_plan(lengths, TrainingSection(per_device_train_batch_size=2, max_steps=4), 128, True, long_after=32)
        assert {len(g) for g in plan.groups} and len(plan.groups) == 2
        seen = []
        for step in range(plan.per_epoch):
            (rows,) = plan.micro_batches(step)
            kinds = {len(samples[i].input_ids) > 32 for row in rows for i in row}
            assert len(kinds) == 1, f"micro-batch {step} mixes short and long samples: {rows}"
            batch = collate(samples, rows, pad)
            assert int(batch["position_ids"].max()) < (32 if kinds == {False} else 70)
            got = token_losses(model, batch)
            want = torch.cat([alone[i] for row in rows for i in row])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32 noise of other batch shapes
            seen += [i for row in rows for i in row]
        assert sorted(seen) == list(range(len(samples)))  # one epoch visits every sample once

        # Eval batches are split the same way: the loss is the mean over samples each computed as if alone.
        loss = eval_loss(TokenLoss(model), samples, batch_size=4, pad_id=pad)
        assert loss == pytest.approx(float(torch.cat(alone).mean()), rel=1e-5)
