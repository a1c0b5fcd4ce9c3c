"""Preference tuning: pair rows, their encoding and masks, DPO and ORPO losses against TRL's, and training runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import pair_data, read_jsonl, tiny_config

from philora import cli
from philora.data import Sample
from philora.data.formats import Columns, RowProblem, to_conversation
from philora.data.render import IGNORE, ChatEncoder
from philora.model.preference import PreferenceLoss
from philora.train.objective import PairObjective

PAIRS = [
    {
        "prompt": [{"role": "user", "content": "Contact: Ada Moss, ada@moss.io"}],
        "chosen": [{"role": "assistant", "content": '{"name": "Ada Moss", "email": "ada@moss.io"}'}],
        "rejected": [{"role": "assistant", "content": '{"name": "ada@moss.io", "email": "Ada Moss"}'}],
    },
    {
        "prompt": [{"role": "user", "content": "Who wrote this? -- Bo Lind, Lind & Co"}],
        "chosen": [{"role": "assistant", "content": '{"name": "Bo Lind", "company": "Lind & Co"}'}],
        "rejected": [{"role": "assistant", "content": "Who wrote this?"}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": "Cy Ng from Oslo"},
            {"role": "assistant", "content": '{"name": "Cy Ng"}'},
            {"role": "user", "content": "And the city?"},
        ],
        "chosen": [{"role": "assistant", "content": '{"name": "Cy Ng", "city": "Oslo"}'}],
        "rejected": [{"role": "assistant", "content": '{"name": "Cy Ng", "city": null}'}],
    },
]


# --- rows ---------------------------------------------------------------------------------------------------------


def convert(row: dict[str, Any]) -> Any:
    return to_conversation(row, "pairs.jsonl:3", "preference", Columns(None))


def test_pair_rows_of_both_shapes_become_the_same_conversation() -> None:
    prompt_shape = convert(PAIRS[2])
    whole = {"chosen": PAIRS[2]["prompt"] + PAIRS[2]["chosen"], "rejected": PAIRS[2]["prompt"] + PAIRS[2]["rejected"]}
    conversation_shape = convert(whole)
    assert prompt_shape.messages == conversation_shape.messages
    assert prompt_shape.rejected == conversation_shape.rejected == PAIRS[2]["rejected"][0]
    # the prompt's own answers are context, never scored; the chosen answer is the conversation's last message
    assert [m.get("train", True) for m in prompt_shape.messages if m["role"] == "assistant"] == [False, True]
    strings = convert({"prompt": "Q?", "chosen": "yes", "rejected": "no"})
    assert strings.sides == [
        [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "yes"}],
        [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "no"}],
    ]


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ({"prompt": "Q?", "chosen": "yes"}, "no 'rejected' key"),
        ({"prompt": "Q?", "chosen": "same", "rejected": "same"}, "are the same answer"),
        ({"prompt": "Q?", "chosen": "yes", "rejected": ""}, "'rejected' is empty"),
        (
            {
                "chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "b"}],
            },
            "differ at message 0 before their last message",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "Q"}],
            },
            "'rejected' must end with the assistant answer",
        ),
        ({"prompt": "Q?", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}, "only hold assistant"),
    ],
)
def test_bad_pairs_are_refused_with_the_reason(row: dict[str, Any], says: str) -> None:
    with pytest.raises(RowProblem, match=says):
        convert(row)


def test_a_pair_scores_only_each_final_answer_and_its_end_of_turn(tiny_phi3: Path) -> None:
    from transformers import AutoTokenizer

    encoder = ChatEncoder(AutoTokenizer.from_pretrained(tiny_phi3))
    conversation = convert(PAIRS[2])
    chosen, rejected = (encoder.encode(side, "last_assistant") for side in conversation.sides)
    for sample, answer in ((chosen, PAIRS[2]["chosen"][0]), (rejected, PAIRS[2]["rejected"][0])):
        scored = sample.input_ids[sample.labels != IGNORE].tolist()
        assert encoder.tokenizer.decode(scored) == answer["content"] + "<|im_end|>"
    # both sides share the prompt's tokens exactly
    start = int(np.argmax(chosen.labels != IGNORE))
    assert chosen.input_ids[:start].tolist() == rejected.input_ids[:start].tolist()


# --- losses against TRL -------------------------------------------------------------------------------------------


def lora_model(tiny_phi3: Path) -> Any:
    """The tiny Phi-3 with a LoRA whose B is random, so the policy differs from its base (the reference)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return peft_model


def lora_grads(model: Any) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def philora_pairs(input_ids: torch.Tensor, keep: torch.Tensor, scored: torch.Tensor) -> list[tuple[Sample, Sample]]:
    """TRL's padded [chosen..., rejected...] rows as philora's pairs: the same tokens, the same scored ones."""
    samples = []
    for ids, real, mask in zip(input_ids, keep.bool(), scored.bool(), strict=True):
        tokens = ids[real].numpy().astype(np.int32)
        samples.append(Sample(tokens, np.where(mask[real].numpy(), tokens, IGNORE).astype(np.int32)))
    n = len(samples) // 2
    return list(zip(samples[:n], samples[n:], strict=True))


def packed_loss(loss: PreferenceLoss, objective: PairObjective, nll_scale: float | None = None) -> Any:
    """philora's loss over every pair packed into one row, as a mean over pairs, and its statistics."""
    batch = objective.batch([list(range(len(objective.pairs)))])
    if nll_scale is not None:
        batch["nll_scale"] = torch.tensor(nll_scale, dtype=torch.float64)
    total, stats = loss(**batch)
    return total / len(objective.pairs), stats


@pytest.mark.parametrize(
    ("loss_type", "weights"), [("sigmoid", None), ("hinge", None), ("ipo", None), (["sigmoid", "sft"], [1.0, 0.5])]
)
def test_dpo_loss_and_gradients_equal_trl(
    tiny_phi3: Path, tmp_path: Path, loss_type: str | list[str], weights: list[float] | None
) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = lora_model(tiny_phi3)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_phi3)
    args = DPOConfig(output_dir=str(tmp_path), beta=0.1, loss_type=loss_type, loss_weights=weights,
                     per_device_train_batch_size=3, report_to=[],
                     max_length=None, precompute_ref_log_probs=False, bf16=False, gradient_checkpointing=False,
                     use_cpu=True)  # fmt: skip
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    assert "ref" in model.peft_config  # TRL keeps the adapter as it starts as the reference, as philora does
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    pairs = philora_pairs(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    loss = PreferenceLoss(model, "dpo", beta=0.1, loss_type=loss_type, loss_weights=weights)
    objective = PairObjective(pairs, tokenizer.pad_token_id, 4096)
    model.eval()
    objective.reference = objective.sequence_logprobs(loss, 2)  # the model as training starts, computed once
    with torch.no_grad():  # a policy that has moved away from the reference
        for name, parameter in model.named_parameters():
            if "lora_B.default" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    model.train()
    expected = trainer.compute_loss(model, batch)
    expected.backward()
    expected_grads = lora_grads(model)
    trl_rewards = trainer._metrics["train"]["rewards/accuracies"][-1], trainer._metrics["train"]["rewards/margins"][-1]

    got, stats = packed_loss(loss, objective, len(pairs) / sum(chosen.trained for chosen, _ in pairs))
    got.backward()
    got_grads = lora_grads(model)

    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    assert expected.item() != pytest.approx(np.log(2), abs=1e-3)  # the policy is not the reference
    assert got_grads.keys() == expected_grads.keys() and got_grads
    for name, grad in expected_grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-4, atol=1e-5), name
    assert stats["rewards/accuracies"].item() / len(pairs) == pytest.approx(trl_rewards[0], abs=1e-6)
    assert stats["rewards/margins"].item() / len(pairs) == pytest.approx(trl_rewards[1], abs=1e-5)


def test_orpo_loss_and_gradients_equal_trls_odds_ratio(tiny_phi3: Path) -> None:
    """TRL's ORPOTrainer functions (sequence log-probs averaged per token, the odds-ratio loss) on the same logits;
    the NLL is the chosen answers' mean token cross-entropy (TRL's ORPO also counts the prompt's tokens)."""
    from transformers import AutoTokenizer
    from trl.experimental.orpo import ORPOTrainer

    model = lora_model(tiny_phi3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_phi3)
    encoder = ChatEncoder(tokenizer)
    pairs = []
    for row in PAIRS:
        chosen, rejected = (encoder.encode(side, "last_assistant") for side in convert(row).sides)
        pairs.append((chosen, rejected))
    # TRL's layout: a padded batch of every chosen sequence, then every rejected one
    sides = [p[0] for p in pairs] + [p[1] for p in pairs]
    width = max(len(s.input_ids) for s in sides)
    ids = torch.full((len(sides), width), tokenizer.pad_token_id)
    labels = torch.full((len(sides), width), IGNORE)
    mask = torch.zeros((len(sides), width), dtype=torch.long)
    for i, s in enumerate(sides):
        ids[i, : len(s.input_ids)], labels[i, : len(s.labels)] = (
            torch.from_numpy(s.input_ids),
            torch.from_numpy(s.labels),
        )
        mask[i, : len(s.input_ids)] = 1
    model.train()
    logits = model(input_ids=ids, attention_mask=mask).logits
    logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    n = len(pairs)
    fake_self = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    ratio_losses, *_ = ORPOTrainer.odds_ratio_loss(fake_self, logps[:n], logps[n:])
    nll = torch.nn.functional.cross_entropy(logits[:n, :-1].flatten(0, 1), labels[:n, 1:].flatten())
    expected = nll - ratio_losses.mean()
    expected.backward()
    expected_grads = lora_grads(model)

    objective = PairObjective(pairs, tokenizer.pad_token_id, 4096)
    chosen_tokens = sum(c.trained for c, _ in pairs)
    got, stats = packed_loss(PreferenceLoss(model, "orpo", beta=0.1), objective, n / chosen_tokens)
    got.backward()
    got_grads = lora_grads(model)
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    for name, grad in expected_grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-4, atol=1e-5), name
    assert stats["logps/chosen"].item() / n == pytest.approx(logps[:n].mean().item(), abs=1e-5)


# --- training runs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_training_logs_rewards_and_learns_the_train_pairs(
    method: str, tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path]
) -> None:
    from philora.config import load_config
    from philora.train.run import train

    data = pair_data(tmp_path, tiny_data)
    path = tiny_config(tmp_path, tiny_phi3, data, method=method, max_steps=8, learning_rate=0.02,
                       predict_with_generate=False, output_dir=str(tmp_path / "out"))  # fmt: skip
    result = train(load_config(path, []))
    records = read_jsonl(result.output_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(steps[0])
    if method == "dpo":  # the policy starts as the reference: every margin 0, the loss log 2
        first = train_first_step(load_config(path, ["training_config.max_steps=1", "training_config.logging_steps=1",
                                                    f"training_config.output_dir={tmp_path / 'one'}"]))  # fmt: skip
        assert first["loss"] == pytest.approx(np.log(2), abs=1e-6)
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        assert (result.output_dir / "reference-train.npy").is_file()
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["rewards/accuracies"] > max(steps[0]["rewards/accuracies"], 0.5)
    evals = [r for r in records if "eval_loss" in r]  # a random 2-layer model: held-out pairs move, and little
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and evals[-1]["eval_rewards/margins"] > 0
    # `philora eval` on the run's eval pairs measures what the run measured last (dpo: against the base again)
    assert cli.main(["eval", "--adapter", str(result.output_dir), "--no-base"]) == 0
    measured = json.loads((result.output_dir / "eval" / "eval.json").read_text())["preference"]
    assert measured["method"] == method and measured["pairs"] == 6
    for name in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert measured[name] == pytest.approx(evals[-1][f"eval_{name}"], rel=1e-5, abs=1e-7), name
    # a plain PEFT adapter: it merges like an SFT one, with merge's own parity check passing
    assert cli.main(["merge", "--adapter", str(result.output_dir), "--output", str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["passed"]


def test_dpo_continues_a_trained_adapter_which_is_also_its_reference(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """SFT, then DPO from its adapter: the policy starts as that adapter (the first loss is log 2 only if the
    reference is the same model), its weights are where training starts, and a base that is not the adapter's is
    refused."""
    from safetensors.torch import load_file

    sft = tiny_config(tmp_path, tiny_phi3, tiny_data, max_steps=4, predict_with_generate=False, save_steps=100)
    # no dropout: DPO continues with the adapter's own, and its masks would move the first step off the reference
    no_dropout = ["--set", "peft_config.lora_dropout=0.0"]
    assert cli.main(["train", "--config", str(sft), "--output", str(tmp_path / "sft"), *no_dropout]) == 0
    pairs = pair_data(tmp_path, tiny_data)
    dpo = tiny_config(tmp_path, tiny_phi3, pairs, method="dpo", max_steps=1, logging_steps=1, learning_rate=1e-9,
                      predict_with_generate=False, save_steps=100)  # fmt: skip
    adapter = f"model.adapter={tmp_path / 'sft'}"
    assert cli.main(["train", "--config", str(dpo), "--output", str(tmp_path / "dpo"), "--set", adapter]) == 0
    assert f"LoRA from {tmp_path / 'sft' / 'adapter'} on" in capsys.readouterr().err
    first = read_jsonl(tmp_path / "dpo" / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-6) and first["rewards/margins"] == pytest.approx(
        0, abs=1e-6
    )
    started, after = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("sft", "dpo"))
    assert started.keys() == after.keys()
    assert all(torch.allclose(started[k], after[k], atol=1e-6) for k in started)  # lr 1e-9: one tiny step
    shutil.copytree(tiny_phi3, tmp_path / "elsewhere")  # the same weights under another name: another base
    other = f"model.name_or_path={tmp_path / 'elsewhere'}"
    assert cli.main(["train", "--config", str(dpo), "--output", str(tmp_path / "x"), "--set", adapter,
                     "--set", other]) == 2  # fmt: skip
    assert "was trained on" in capsys.readouterr().err


def test_data_check_counts_pairs_and_shows_the_chosen_answer_scored(
    tmp_path: Path, tiny_phi3: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    assert cli.main(["data", "check", str(path), "--model", str(tiny_phi3), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "preference" and report["rows"] == 3 and report["samples"] == 6
    assert report["pairs"]["count"] == 3 and report["pairs"]["chosen_longer"] == pytest.approx(2 / 3, abs=1e-4)
    assert report["pairs"]["chosen_shorter"] == 0.0  # the first pair's two answers are as long as each other
    assert cli.main(["data", "check", str(path), "--model", str(tiny_phi3)]) == 0
    out = capsys.readouterr().out
    assert "data: 3 preference pairs; scored answer tokens p50" in out
    assert '⟦{"name": "Ada Moss", "email": "ada@moss.io"}<|im_end|>⟧' in out


def train_first_step(config: Any) -> dict[str, Any]:
    from philora.train.run import train

    result = train(config)
    return next(r for r in read_jsonl(result.output_dir / "metrics.jsonl") if "loss" in r)
