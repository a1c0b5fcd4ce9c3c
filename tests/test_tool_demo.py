"""The tool-calling demo end to end on the embedded model: it learns to call the sample's functions (base beside
fine-tuned on the held-out rows), its adapter keeps the tools template it trained with, and `philora serve` with
that adapter answers the official client's request with tools as `tool_calls`, then the follow-up with the result
in words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_serve import KEY, start_server, stop_server

from philora import hardware
from philora.config import load_config
from philora.train.run import train


@pytest.mark.slow
def test_tool_demo_learns_to_call_and_its_adapter_serves_the_calls(tmp_path: Path, embedded_dir: Path) -> None:
    from transformers import AutoTokenizer

    dtype = "bfloat16" if hardware.cpu_detects_bf16() else "float32"  # as test_demo: the CPU's native dtype
    overrides = [f"training_config.output_dir={tmp_path / 'tools'}", f"model.dtype={dtype}", "data.max_eval_samples=40"]
    result = train(load_config("demo-tools", overrides))
    before, after = result.evaluation["before"], result.evaluation["after"]
    assert before["tool_valid_call"] <= 0.1 and before["tool_arguments"] <= 0.1, before
    assert after["tool_valid_call"] >= 0.8 and after["tool_name"] >= 0.7 and after["tool_arguments"] >= 0.5, after
    assert after["tool_no_call"] >= 0.75 and after["tool_decision"] >= before["tool_decision"] + 0.4, (before, after)
    assert after["exact_match"] >= before["exact_match"] + 0.3, (before, after)
    adapter = result.output_dir / "adapter"
    assert "<tool_call>" in AutoTokenizer.from_pretrained(adapter).chat_template  # what serve must render with

    rows = [json.loads(line) for line in (Path(__file__).parent.parent / "philora/sample/tools-eval.jsonl").open()]
    row = next(r for r in rows if len(r["messages"]) == 2 and len(r["messages"][1].get("tool_calls") or []) == 1)
    server = start_server(["--adapter", f"tools={adapter}", "--api-key", KEY], tmp_path / "log")
    try:
        client = server.client()
        ask = row["messages"][:1]
        reply = client.chat.completions.create(model="tools", messages=ask, tools=row["tools"], temperature=0)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        call = choice.message.tool_calls[0]
        expected = row["messages"][1]["tool_calls"][0]["function"]
        assert call.function.name == expected["name"]
        assert json.loads(call.function.arguments) == json.loads(expected["arguments"])
        result_message = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"value": 42})}
        follow = [*ask, choice.message.model_dump(exclude_none=True), result_message]
        answer = client.chat.completions.create(model="tools", messages=follow, tools=row["tools"], temperature=0)
        assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
        assert answer.choices[0].message.content
    finally:
        assert stop_server(server) == 0
