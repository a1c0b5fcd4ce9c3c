"""The demo end to end on the embedded model: it learns the task, and plain peft reproduces what it trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from philora.config import load_config
from philora.train import train


@pytest.mark.slow
def test_demo_visibly_learns_and_its_adapter_loads_in_plain_peft(tmp_path: Path, embedded_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(load_config(None, [f"training_config.output_dir={tmp_path / 'demo'}"]))
    before, after = result.evaluation["before"], result.evaluation["after"]
    assert before["exact_match"] <= 0.1, before
    assert after["exact_match"] >= before["exact_match"] + 0.4, (before, after)
    assert after["json_valid"] >= 0.9, after
    run = json.loads((result.output_dir / "run.json").read_text())
    assert run["generation_eval"]["after"] == after

    base = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, result.output_dir / "adapter").eval()
    prompt = result.evaluation["samples"][0]["prompt"]
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir / "adapter")
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ours = result.model.eval()(**ids).logits
        torch.testing.assert_close(reloaded(**ids).logits, ours, rtol=0, atol=1e-5)
