"""`philora chat` and the generation loop under it: the loop's greedy answers are transformers' own, alone or
batched; answers stop at the end-of-turn token and never show it; text streams without splitting characters;
the chat keeps history, /reset clears it, /exit quits, over a pipe; a multi-line message (between \"\"\" lines, or
pasted in a terminal) is one turn."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from philora import cli
from philora.errors import UserError
from philora.infer.chat import Session, read_message, repl
from philora.infer.generation import Detokenizer, Row, Settings, StopText, complete, generate, prompt_ids

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Hi", "What is the capital of France?", "Tell me a long story about a dragon " * 3, "2+2?"]


@pytest.fixture(scope="module")
def lora(tiny_phi3: Path) -> tuple[Any, Any]:
    """tiny_phi3 under a random LoRA (non-zero B): answers that depend on the prompt. (model, encoder)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from philora.config import ModelSection
    from philora.data.render import ChatEncoder
    from philora.model.load import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    torch.manual_seed(3)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    return model, ChatEncoder(load_tokenizer(ModelSection(name_or_path=str(tiny_phi3))))


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def test_greedy_answers_are_transformers_own_alone_and_batched(lora: tuple[Any, Any]) -> None:
    from philora.eval.runner import generate as hf_generate

    model, encoder = lora
    answered: list[int] = []  # eval's progress: one call per batch, with its size
    prompts = [(chat(p), None) for p in PROMPTS]  # (messages, tools) as eval gives them
    reference = hf_generate(model, encoder, prompts, 10, batch_size=3, answered=answered.append)
    assert answered == [3, len(PROMPTS) - 3]
    assert hf_generate(model, encoder, prompts, max_new_tokens=10, batch_size=1) == reference
    alone = [complete(model, encoder, chat(p), Settings(max_new_tokens=10, temperature=0)) for p in PROMPTS]
    lengths = (10, 3, 10, 6)  # rows leave the batch at different steps
    rows = [
        Row(prompt_ids(encoder, chat(p)), Settings(max_new_tokens=n, temperature=0))
        for p, n in zip(PROMPTS, lengths, strict=True)
    ]
    together = generate(model, encoder, rows)
    assert [a.text.strip() for a in alone] == reference and len(set(reference)) == len(PROMPTS)
    for a, t, n in zip(alone, together, lengths, strict=True):
        assert t.completion_tokens == n and t.finish_reason == "length"
        assert a.text.startswith(t.text) and (n < 10 or t.text == a.text)
    assert [a.prompt_tokens for a in alone] == [len(r.prompt_ids) for r in rows]


def test_answers_end_at_the_end_of_turn_token_which_is_never_shown(lora: tuple[Any, Any]) -> None:
    model, encoder = lora
    ids = prompt_ids(encoder, chat(PROMPTS[0]))
    tokens = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    k = next(i for i in range(2, 12) if tokens[i] not in tokens[:i])  # a token that first shows up at i
    end_of_turn = encoder.end_of_turn_id
    encoder.end_of_turn_id = tokens[k]  # as if the model said its end-of-turn token there
    try:
        pieces: list[str] = []
        result = complete(model, encoder, chat(PROMPTS[0]), Settings(max_new_tokens=12, temperature=0), pieces.append)
    finally:
        encoder.end_of_turn_id = end_of_turn
    assert result.finish_reason == "stop" and result.completion_tokens == k
    assert result.text == "".join(pieces) == encoder.tokenizer.decode(tokens[:k])
    assert len(pieces) > 1  # streamed, not delivered at the end


def test_streamed_text_never_splits_a_character(lora: tuple[Any, Any]) -> None:
    tokenizer = lora[1].tokenizer
    text = "Grüße, 世界! 🙂👍🏽 naïve café — ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detokenizer = Detokenizer(tokenizer)
    pieces = [detokenizer.push(t) for t in ids]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces.count("") >= 3  # the emoji's byte tokens were held back until each character was whole


def test_stop_strings_cut_the_text_even_across_pieces() -> None:
    stop = StopText(["END", "xyz"])
    assert [stop.feed(p) for p in ["Hello E", "N", "x", "yz!"]] == ["Hello ", "", "EN", ""]
    assert stop.hit
    partial = StopText(["END"])
    assert [partial.feed(p) for p in ["ab E", "Nd", "E"]] == ["ab ", "ENd", ""] and partial.flush() == "E"


def test_session_keeps_history_and_reset_keeps_only_the_system_prompt(lora: tuple[Any, Any]) -> None:
    model, encoder = lora
    session = Session(model, encoder, Settings(max_new_tokens=6, temperature=0), system="Answer briefly.")
    first = session.ask("Hello there", lambda text: None)
    second = session.ask("And then?", lambda text: None)
    system = {"role": "system", "content": "Answer briefly."}
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == first.text.strip() and first.text.strip()
    assert second.prompt_tokens == len(encoder.ids(session.messages[:4], generation_prompt=True))
    session.reset()
    assert session.messages == [system]
    out = io.StringIO()
    assert repl(session, io.StringIO("Hello there\n/reset\n\n/nope\nHello there\n/exit\nnever read\n"), out) == 0
    assert out.getvalue().count(">>> ") == 6
    answers = [a for a in out.getvalue().split(">>> ") if a]
    assert answers == [first.text.strip() + "\n"] * 2 and session.messages[1]["content"] == "Hello there"
    assert len(session.messages) == 3  # the /reset between the two questions cleared the first


def test_chat_over_a_pipe_streams_stopped_answers(embedded_dir: Path) -> None:
    """The real command on the embedded model, stdin a pipe: two answers, /reset between, then /exit."""
    question = "What is the capital of France?"
    lines = f"{question}\n/reset\n{question}\n/exit\n{question}\n"
    command = [sys.executable, "-m", "philora", "chat", "--max-new-tokens", "40"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread beats two that fight for a busy CPU
    done = subprocess.run(command, input=lines, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert out.count(">>> ") == 4  # the question after /exit is never read
    answers = [a.strip() for a in out.split(">>> ") if a.strip()]
    assert len(answers) == 2 and answers[0] == answers[1] and "Paris" in answers[0]
    assert "<|" not in out and "im_end" not in out and len(answers[0]) < 120
    assert "history cleared" in done.stderr and "cut at" not in done.stderr and "Traceback" not in done.stderr


def test_bad_adapter_or_flags_exit_2_with_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["chat", "--adapter", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--adapter" in err and "no such directory" in err and "Traceback" not in err
    assert cli.main(["chat", "--temperature", "-1", "--top-p", "0", "--max-new-tokens", "0"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[2].strip() for line in lines] == ["--max-new-tokens", "--temperature", "--top-p"]


def test_chat_command_answers_with_the_adapter(
    lora: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model, encoder = lora
    model.save_pretrained(tmp_path / "adapter")  # names tiny_phi3 as its base
    expected = Session(model, encoder, Settings(max_new_tokens=5, temperature=0), system="Be brief.")
    answer = expected.ask("Hello there", lambda text: None).text.strip()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n"))
    args = ["--adapter", str(tmp_path / "adapter"), "--dtype", "float32", "--system", "Be brief."]
    assert cli.main(["chat", *args, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == f">>> {answer}\n>>> \n" and answer


class Recorder:
    """A session that records what it is asked (no tools: no calls)."""

    call_syntax = None

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.pending_calls: list[dict[str, Any]] = []

    def ask(self, text: str, on_text: Any) -> Any:
        self.asked.append(text)
        on_text("ok")
        return type("Result", (), {"finish_reason": "stop"})()


def test_lines_between_triple_quotes_are_one_turn_and_other_lines_one_each() -> None:
    session = Recorder()
    block = 'first\n"""\nDear team,\n\n/reset is text here\n"""\nlast\n"""\nleft open\nat the end\n'
    out = io.StringIO()
    assert repl(session, io.StringIO(block), out) == 0  # type: ignore[arg-type]
    assert session.asked == ["first", "Dear team,\n\n/reset is text here", "last", "left open\nat the end"]
    assert out.getvalue().count("... ") == 7  # the continuation prompt inside blocks


@pytest.mark.parametrize("word", ["exit", "quit", "  Quit ", "EXIT", "/exit", "/quit"])
def test_exit_or_quit_alone_on_a_line_leaves_the_chat(word: str) -> None:
    session = Recorder()
    assert repl(session, io.StringIO(f"exit now\n{word}\nnever read\n"), io.StringIO()) == 0  # type: ignore[arg-type]
    assert session.asked == ["exit now"]  # said within a sentence, it is a message


def test_lines_pasted_into_a_terminal_together_are_one_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pseudo-terminal: lines written in one go (a paste) are one message; a line typed alone is its own."""
    import pty

    master, slave = pty.openpty()
    terminal = os.fdopen(slave, "r")
    monkeypatch.setattr(sys, "stdin", terminal)
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # input() writes its prompt there
    try:
        os.write(master, b"pasted line one\npasted line two\n")
        assert read_message(terminal, io.StringIO()) == "pasted line one\npasted line two"
        os.write(master, b"typed alone\n")
        assert read_message(terminal, io.StringIO()) == "typed alone"
    finally:
        terminal.close()
        os.close(master)


def test_chat_with_tools_shows_calls_takes_their_results_and_answers(
    embedded_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import ScriptedModel
    from transformers import AutoTokenizer

    from philora.data.render import ChatEncoder
    from philora.infer.chat import read_tools

    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    path = tmp_path / "tools.json"
    path.write_text(json.dumps({"tools": [weather]}))
    encoder = ChatEncoder(AutoTokenizer.from_pretrained(embedded_tokenizer))
    encoder.use_tools()
    model = ScriptedModel(encoder)
    model.script('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    model.script("Sunny and 21C in Oslo.")
    session = Session(model, encoder, Settings(max_new_tokens=64, temperature=0), tools=read_tools(str(path)))
    out = io.StringIO()
    assert repl(session, io.StringIO("Weather in Oslo?\nsunny, 21C\n/exit\n"), out) == 0
    shown = out.getvalue()
    assert 'Let me look.\n→ get_weather({"city": "Oslo"})\nget_weather> Sunny and 21C in Oslo.\n' in shown
    assert "<tool_call>" not in shown  # the call's text is shown as a call, not as JSON in tags
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"]
    second = encoder.tokenizer.decode(model.prompts[-1])
    assert "<|im_start|>tool\n<tool_response>\nsunny, 21C\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in (
        second
    )
    path.write_text('[{"type": "function", "function": {"description": "no name"}}]')
    with pytest.raises(UserError, match=r"--tools .*tools\[0\]\.function\.name is missing"):
        read_tools(str(path))
