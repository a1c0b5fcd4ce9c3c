"""The demo end to end on the embedded model: it learns the task, plain peft reproduces what it trained, and
`philora eval` on its adapter reports the scores the run recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from philora import cli, hardware
from philora.config import load_config
from philora.train.run import train


@pytest.mark.slow
def test_demo_visibly_learns_and_its_adapter_loads_in_plain_peft(
    tmp_path: Path, embedded_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The demo as this CPU runs it: bf16 where the CPU computes it natively (AMX), fp32 elsewhere. Not per
    # PHILORA_CPU_BF16: emulated bf16 trains the 135M model about 25x slower (over an hour on 2 cores).
    dtype = "bfloat16" if hardware.cpu_detects_bf16() else "float32"
    result = train(load_config(None, [f"training_config.output_dir={tmp_path / 'demo'}", f"model.dtype={dtype}"]))
    before, after = result.evaluation["before"], result.evaluation["after"]
    assert before["exact_match"] <= 0.1, before
    assert after["exact_match"] >= before["exact_match"] + 0.4, (before, after)
    assert after["json_valid"] >= 0.9, after
    run = json.loads((result.output_dir / "run.json").read_text())
    assert run["generation_eval"]["after"] == after

    base = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=hardware.DTYPES[dtype])  # as it trained
    reloaded = PeftModel.from_pretrained(base, result.output_dir / "adapter").eval()
    prompt = result.evaluation["samples"][0]["prompt"]
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir / "adapter")
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ours = result.model.eval()(**ids).logits
        torch.testing.assert_close(reloaded(**ids).logits, ours, rtol=0, atol=1e-5)

    # `philora eval` on the demo's adapter: base (adapter disabled) and fine-tuned from one load, the run's eval set
    # and generation settings by default: the same scores and eval losses as the run's own eval.json.
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(result.output_dir)]) == 0
    err = capsys.readouterr().err
    recorded = json.loads((result.output_dir / "eval.json").read_text())
    ours = json.loads((result.output_dir / "eval" / "eval.json").read_text())
    assert ours["prompts"] == recorded["prompts"] == 40
    assert ours["before"] == before and ours["after"] == after
    for model in ("before", "after"):
        assert ours["loss"][model]["eval_loss"] == pytest.approx(recorded["loss"][model]["eval_loss"], rel=1e-5)
    assert ours["loss"]["after"]["eval_loss"] < ours["loss"]["before"]["eval_loss"]
    row = next(line.split() for line in err.splitlines() if line.strip().startswith("exact match"))
    assert row[2:4] == [f"{100 * before['exact_match']:.1f}%", f"{100 * after['exact_match']:.1f}%"]
    assert (result.output_dir / "eval" / "report.html").is_file() and (result.output_dir / "report.html").is_file()
