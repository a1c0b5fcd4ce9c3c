"""Learning that holds: evaluations during training scored like `philora eval`, the best step's adapter kept,
early stopping, exact resume inside patience, the regression verdict, NEFTune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, tiny_config
from safetensors.torch import load_file

from philora import cli
from philora.config import TrainingSection, load_config
from philora.errors import UserError
from philora.train import checkpoint, neftune, selection
from philora.train.selection import Selection

ADAPTER = "adapter/adapter_model.safetensors"


def test_the_best_is_strictly_better_and_patience_counts_evaluations_without_enough_gain() -> None:
    chosen = Selection()
    assert selection.record(chosen, 2, 0.50, True, 0.05)  # the first is the best so far
    assert not selection.record(chosen, 4, 0.50, True, 0.05) and chosen.since_improved == 1  # a tie is no gain
    assert selection.record(chosen, 6, 0.53, True, 0.05)  # better, so the best ...
    assert chosen.since_improved == 2  # ... but by less than the threshold: patience goes on counting
    assert selection.record(chosen, 8, 0.60, True, 0.05) and chosen.since_improved == 0
    assert (chosen.best_step, chosen.best_value, chosen.evaluations) == (8, 0.60, 4)
    lower = Selection()
    for step, loss in ((1, 2.0), (2, 1.5), (3, 1.7)):
        selection.record(lower, step, loss, False, 0.0)
    assert (lower.best_step, lower.since_improved) == (2, 1)
    tc = TrainingSection(early_stopping_patience=1)
    assert selection.patience_out(lower, tc) and not selection.patience_out(lower, TrainingSection())


def test_the_metric_and_its_direction_follow_transformers_names() -> None:
    assert selection.metric_name(TrainingSection(), scored=True) == "eval_exact_match"
    assert selection.metric_name(TrainingSection(), scored=False) == "eval_loss"
    assert selection.metric_name(TrainingSection(metric_for_best_model="rouge_l"), True) == "eval_rouge_l"
    assert not selection.greater_is_better(TrainingSection(), "eval_loss")
    assert selection.greater_is_better(TrainingSection(), "eval_rewards/accuracies")
    assert selection.greater_is_better(TrainingSection(greater_is_better=True), "eval_loss")
    with pytest.raises(UserError, match="eval_rouge_L is not among this run's eval metrics; use one of eval_loss"):
        selection.require_metric("eval_rouge_L", ["eval_loss", "eval_rouge_l"])


def test_the_advice_on_a_regression_leaves_out_what_the_run_does_already() -> None:
    plain = selection.fixes(TrainingSection(method="dpo"))
    assert "loss_type: [sigmoid, sft]" in plain and "load_best_model_at_end: true" in plain and "--answers" in plain
    done = selection.fixes(TrainingSection(method="dpo", loss_type=["sigmoid", "sft"], load_best_model_at_end=True))
    assert "loss_type" not in done and "load_best_model_at_end" not in done
    assert done.startswith("lower training_config.learning_rate")


def test_a_regression_is_found_on_the_chosen_metric_or_else_on_exact_match() -> None:
    evaluation = {"before": {"exact_match": 0.6, "rouge_l": 0.95}, "after": {"exact_match": 0.275, "rouge_l": 0.9},
                  "loss": {"after": {"eval_loss": 0.4}}}  # fmt: skip
    assert selection.regression(evaluation, "eval_exact_match", True) == ("eval_exact_match", 0.6, 0.275)
    # the eval loss of the start was not measured (a dpo run from an adapter): exact match decides
    assert selection.regression(evaluation, "eval_loss", False) == ("eval_exact_match", 0.6, 0.275)
    better = {"before": {"exact_match": 0.2}, "after": {"exact_match": 0.9}}
    assert selection.regression(better, "eval_exact_match", True) is None
    losses = {"loss": {"before": {"eval_loss": 1.0}, "after": {"eval_loss": 1.2}}}
    assert selection.regression(losses, "eval_loss", False) == ("eval_loss", 1.0, 1.2)
    assert selection.regression({}, "eval_loss", False) is None  # nothing to compare: no verdict


def test_selection_needs_evaluations_during_training(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    path = tiny_config(tmp_path, tiny_phi3, tiny_data, eval_strategy="no", load_best_model_at_end=True,
                       early_stopping_patience=2)  # fmt: skip
    assert cli.main(["train", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "training_config.load_best_model_at_end: needs evaluations during training" in err
    assert "training_config.early_stopping_patience: needs evaluations during training" in err
    path = tiny_config(tmp_path, tiny_phi3, tiny_data, metric_for_best_model="json_macth")
    assert cli.main(["train", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    assert (
        "eval_json_macth is not among this run's eval metrics; use one of eval_exact_match" in capsys.readouterr().err
    )
    assert not (tmp_path / "out" / "adapter").exists()


def test_answers_are_scored_at_each_evaluation_and_the_best_steps_adapter_is_written(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The 'best' here is the highest eval loss (greater_is_better: true), which a run that learns reaches at its
    first evaluation: a best step well before the last, as in a run that gets worse after it."""
    path = tiny_config(tmp_path, tiny_phi3, tiny_data, max_steps=8, eval_steps=2, save_steps=2, save_total_limit=1,
                       metric_for_best_model="eval_loss", greater_is_better=True, load_best_model_at_end=True,
                       eval_generate_samples=4)  # fmt: skip
    out = tmp_path / "out"
    assert cli.main(["train", "--config", str(path), "--output", str(out)]) == 0
    records = read_jsonl(out / "metrics.jsonl")
    evals = [r for r in records if "eval_exact_match" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6, 8]  # step 0: the starting model's answers
    assert all({"eval_rouge_l", "eval_json_valid", "eval_json_match"} <= r.keys() for r in evals)
    assert all("eval_loss" in r for r in evals[1:])
    losses = {r["step"]: r["eval_loss"] for r in evals[1:]}
    best = max(losses, key=lambda s: losses[s])
    assert best < 8
    chosen = json.loads((out / "run.json").read_text())["selection"]
    assert chosen["best_step"] == chosen["adapter_step"] == best and chosen["last_step"] == 8
    assert chosen["best_value"] == losses[best] and chosen["evaluations"] == 4
    # save_total_limit 1 keeps the newest checkpoint and the best one
    assert sorted(p.name for p in checkpoint.checkpoints(out)) == sorted({f"step-{best}", "step-6"})
    written, kept = load_file(out / ADAPTER), load_file(out / f"checkpoints/step-{best}/{ADAPTER}")
    assert written.keys() == kept.keys() and all(torch.equal(written[k], kept[k]) for k in written)
    assert f"adapter: step {best}'s weights, the best eval_loss" in capsys.readouterr().err
    card = (out / "adapter" / "README.md").read_text()
    assert f"step {best}, chosen by load_best_model_at_end" in card
    assert b"held-out scores" in (out / "report.html").read_bytes()


def stop_config(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], **more: object) -> Path:
    """No evaluation counts as improving by 100 nats: early stopping's count goes 0, 1, 2 ... from the first."""
    return tiny_config(tmp_path, tiny_phi3, tiny_data, predict_with_generate=False, max_steps=20, eval_steps=2,
                       save_steps=2, metric_for_best_model="eval_loss", early_stopping_threshold=100.0,
                       load_best_model_at_end=True, **more)  # fmt: skip


def test_early_stopping_stops_at_the_patience_it_was_given(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    path = stop_config(tmp_path, tiny_phi3, tiny_data, early_stopping_patience=2)
    assert cli.main(["train", "--config", str(path), "--output", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 6 and run["selection"]["stopped_early"]  # evaluations at 2 (0), 4 (1), 6 (2): stop
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r][-1] == 6  # the last window logged
    assert "step 6: stopping early: eval_loss has not improved for 2 evaluations" in capsys.readouterr().err


def test_resume_inside_patience_ends_as_the_uninterrupted_run(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the highest eval loss counts as the best: the first evaluation's, so the checkpoint cut at holds it apart
    path = stop_config(tmp_path, tiny_phi3, tiny_data, early_stopping_patience=3, greater_is_better=True)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli.main(["train", "--config", str(path), "--output", str(whole)]) == 0
    real_save = checkpoint.save

    def save_then_die(*args: object, **kwargs: object) -> Path:
        saved = real_save(*args, **kwargs)
        if saved.name == "step-6":  # two evaluations into patience, the best (step 2) not this checkpoint
            raise KeyboardInterrupt
        return saved

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    assert cli.main(["train", "--config", str(path), "--output", str(cut)]) == 130
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert (cut / "checkpoints/step-6" / checkpoint.BEST).is_file()
    assert cli.main(["train", "--config", str(path), "--output", str(cut), "--resume"]) == 0
    runs = [json.loads((d / "run.json").read_text()) for d in (whole, cut)]
    assert runs[0]["steps"] == runs[1]["steps"] == 8 and runs[0]["selection"] == runs[1]["selection"]
    assert runs[0]["selection"]["adapter_step"] == 2
    assert (whole / ADAPTER).read_bytes() == (cut / ADAPTER).read_bytes()


def test_fail_on_regression_exits_1_after_writing_everything(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Told that a higher eval loss is better, a run that lowers it has regressed by that measure."""
    path = tiny_config(tmp_path, tiny_phi3, tiny_data, eval_strategy="no", metric_for_best_model="eval_loss",
                       greater_is_better=True)  # fmt: skip
    out = tmp_path / "out"
    assert cli.main(["train", "--config", str(path), "--output", str(out), "--fail-on-regression"]) == 1
    err = capsys.readouterr().err
    evaluation = json.loads((out / "eval.json").read_text())
    before, after = evaluation["loss"]["before"]["eval_loss"], evaluation["loss"]["after"]["eval_loss"]
    assert after < before
    assert f"warning: the trained model scores worse than the base model: eval_loss {before:.4f} -> {after:.4f}" in err
    assert "what usually helps with sft: lower training_config.learning_rate or train fewer epochs; evaluate " in err
    assert "philora: error: training_config.fail_on_regression: the trained model scores worse" in err
    assert (out / ADAPTER).is_file() and (out / "adapter" / "README.md").is_file()


def test_neftune_noise_is_there_in_training_only_and_scaled_per_packed_sequence(tiny_phi3: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    ids = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4, 5]])  # three sequences packed: 4, 2 and 6 tokens
    lengths = neftune.sequence_lengths(positions, torch.Size((1, 12)))
    assert lengths.tolist() == [[4, 4, 4, 4, 2, 2, 6, 6, 6, 6, 6, 6]]
    assert neftune.sequence_lengths(None, torch.Size((2, 5))).tolist() == [[5] * 5] * 2
    plain = model.get_input_embeddings()(ids).detach()
    seen = []
    handles = neftune.attach(model, 5.0)
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.detach()))  # after the noise
    model.train()
    model(input_ids=ids, position_ids=positions)
    noise = seen[-1] - plain
    hidden = plain.shape[-1]
    for start, end, length in ((0, 4, 4), (4, 6, 2), (6, 12, 6)):
        bound = 5.0 / (length * hidden) ** 0.5
        assert 0.5 * bound < noise[0, start:end].abs().max() <= bound + 1e-6  # uniform in [-bound, bound]
    model.eval()
    model(input_ids=ids, position_ids=positions)
    assert torch.equal(seen[-1], plain)
    for handle in handles:
        handle.remove()


def test_a_neftune_run_changes_training_not_what_is_saved(tmp_path: Path, tiny_phi3: Path,
                                                          tiny_data: tuple[Path, Path]) -> None:  # fmt: skip
    from philora.train.run import train

    path = tiny_config(tmp_path, tiny_phi3, tiny_data, predict_with_generate=False, max_steps=3, eval_strategy="no")
    outs = {}
    for alpha in (None, 5.0):
        config = load_config(str(path), [f"training_config.neftune_noise_alpha={json.dumps(alpha)}",
                                          f"training_config.output_dir={tmp_path / str(alpha)}"])  # fmt: skip
        result = train(config)
        outs[alpha] = load_file(result.output_dir / ADAPTER)
        embeddings = result.model.get_input_embeddings()
        ids = torch.tensor([[5, 6, 7]])
        result.model.eval()
        assert torch.equal(embeddings(ids), torch.nn.functional.embedding(ids, embeddings.weight))  # off in eval
    assert outs[None].keys() == outs[5.0].keys()  # nothing of NEFTune in the adapter
    assert any(not torch.equal(outs[None][k], outs[5.0][k]) for k in outs[None])  # but the noise changed training
