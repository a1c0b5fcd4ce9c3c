"""`philora serve` as a real subprocess, driven by the official openai client: answers equal the library's own
greedy answers, streamed or not, alone or 16 at once across adapters; errors have OpenAI's shape and status."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from philora import cli

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-philora"


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT/v1
    log: Path

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=120)


def start_server(args: list[str], log: Path, **env: str) -> Server:
    """Start `philora serve --port 0 ARGS`, read the URL from its ready line, wait for /health. One torch thread:
    the tiny model's steps are too small to share, and the reference answers in this process use one too."""
    command = [sys.executable, "-m", "philora", "serve", "--port", "0", "--dtype", "float32", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    with log.open("w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=environment)
    deadline, line = time.monotonic() + 300, ""
    while "http://" not in line:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"philora serve did not start:\n{log.read_text()[-3000:]}")
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline()
    url = re.search(r"http://\S+/v1", line).group()
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    return Server(proc, url, log)


def stop_server(server: Server) -> int:
    server.proc.send_signal(signal.SIGTERM)
    return server.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def adapters(tiny_phi3: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters on tiny_phi3 with random (non-zero) B, so each answers differently: one in a run dir
    (`run-a/adapter`, to be named after the run), one in a plain dir served as `b`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    paths = {"run-a": root / "run-a" / "adapter", "b": root / "plain-b"}
    for seed, path in enumerate(paths.values(), start=1):
        base = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
        torch.manual_seed(seed)
        targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        get_peft_model(
            base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        ).save_pretrained(path)
    return paths


@pytest.fixture(scope="module")
def server(adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--adapter", str(adapters["run-a"].parent), "--adapter", f"b={adapters['b']}", "--api-key", KEY]
    server = start_server([*args, "--max-new-tokens", "24"], log)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def reference(adapters: dict[str, Path], tiny_phi3: Path) -> Any:
    """The library's own greedy answer for (model name, prompt, max tokens), computed in this process."""
    from philora.data.render import ChatEncoder
    from philora.infer.adapters import load, read_adapter
    from philora.infer.generation import Settings, complete

    model, tokenizer = load([read_adapter(path, name) for name, path in adapters.items()], dtype="float32")
    encoder = ChatEncoder(tokenizer)

    def answer(name: str, prompt: str, max_tokens: int) -> Any:
        messages = [{"role": "user", "content": prompt}]
        settings = Settings(max_new_tokens=max_tokens, temperature=0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the server runs: float sums in the same order, the same argmax
        try:
            if name == tiny_phi3.name:
                with model.disable_adapter():
                    return complete(model, encoder, messages, settings)
            model.set_adapter(name)
            return complete(model, encoder, messages, settings)
        finally:
            torch.set_num_threads(threads)

    return answer


def ask(client: openai.OpenAI, model: str, prompt: str, max_tokens: int = 12, **kwargs: Any) -> Any:
    messages = [{"role": "user", "content": prompt}]
    settings = {"temperature": 0, **kwargs}
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, **settings)


def post(server: Server, body: bytes, key: str | None = KEY) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(server.url + "/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_lists_the_base_and_every_adapter(server: Server, tiny_phi3: Path) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [tiny_phi3.name, "run-a", "b"]
    assert server.client().models.retrieve("b").parent == tiny_phi3.name
    assert server.client().models.retrieve("base").id == tiny_phi3.name


def test_completion_is_the_librarys_greedy_answer(server: Server, reference: Any) -> None:
    reply = ask(server.client(), "run-a", "What is the capital of France?", max_tokens=10)
    expected = reference("run-a", "What is the capital of France?", 10)
    assert reply.choices[0].message.content == expected.text and expected.text.strip()
    assert reply.choices[0].finish_reason == expected.finish_reason == "length"
    assert reply.model == "run-a" and reply.object == "chat.completion"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.prompt_tokens, 10)
    assert reply.usage.total_tokens == expected.prompt_tokens + 10


def test_max_tokens_is_capped_by_the_servers_max_new_tokens(server: Server) -> None:
    reply = ask(server.client(), "b", "Count to one hundred", max_tokens=500)
    assert reply.usage.completion_tokens == 24 and reply.choices[0].finish_reason == "length"


def test_streamed_deltas_add_up_to_the_whole_answer(server: Server) -> None:
    client = server.client()
    whole = ask(client, "b", "Tell me about the sea", max_tokens=16)
    usage = {"include_usage": True}
    chunks = list(ask(client, "b", "Tell me about the sea", max_tokens=16, stream=True, stream_options=usage))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) >= 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 16
    assert len({c.id for c in chunks}) == 1


def test_two_adapters_and_the_base_each_give_their_own_answer(server: Server, reference: Any, tiny_phi3: Path) -> None:
    prompt = "Write a short poem about autumn leaves"
    names = (tiny_phi3.name, "run-a", "b", "base")
    answers = {name: ask(server.client(), name, prompt).choices[0].message.content for name in names}
    assert len({answers[tiny_phi3.name], answers["run-a"], answers["b"]}) == 3
    assert answers["base"] == answers[tiny_phi3.name]
    for name in (tiny_phi3.name, "run-a", "b"):
        assert answers[name] == reference(name, prompt, 12).text


def test_sixteen_concurrent_requests_get_the_answers_they_get_alone(
    server: Server, reference: Any, tiny_phi3: Path
) -> None:
    """Mixed prompt lengths and models: batching (left padding) and adapter switching must not show."""
    names = ["run-a", "b", tiny_phi3.name, "run-a"]
    jobs = [(names[i % 4], f"Question {i}: " + "what comes next? " * (i % 5)) for i in range(16)]
    replies: dict[int, Any] = {}

    def send(i: int) -> None:
        replies[i] = ask(server.client(), *jobs[i]).choices[0].message.content

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(replies) == list(range(16))
    expected = {i: reference(name, prompt, 12).text for i, (name, prompt) in enumerate(jobs)}
    assert replies == expected
    assert len({expected[i] for i in range(16) if jobs[i][0] != tiny_phi3.name}) >= 8  # answers differ by prompt


def test_stop_strings_and_seeded_sampling(server: Server) -> None:
    client = server.client()
    text = ask(client, "run-a", "Name some animals", max_tokens=16).choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = ask(client, "run-a", "Name some animals", max_tokens=16, stop=[stop, "never seen"])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 16

    def sample(seed: int) -> str:
        return ask(client, "b", "Say anything", max_tokens=16, temperature=1.0, seed=seed).choices[0].message.content

    assert sample(7) == sample(7) and {sample(7), sample(8), sample(9)} != {sample(7)}
    nucleus = ask(client, "b", "Say anything", max_tokens=16, temperature=1.0, top_p=1e-6, seed=1)
    assert (
        nucleus.choices[0].message.content == ask(client, "b", "Say anything", max_tokens=16).choices[0].message.content
    )


def test_unknown_model_is_404_with_an_openai_error(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        ask(server.client(), "no-such-adapter", "Hi")
    error = caught.value.body
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "model_not_found" and error["param"] == "model" and "run-a" in error["message"]


def test_malformed_or_invalid_bodies_are_400(server: Server) -> None:
    status, body = post(server, b'{"model": "b", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    bad = {"model": "b", "messages": [{"role": "robot", "content": "Hi"}], "temperature": "hot", "max_tokens": 0}
    status, body = post(server, json.dumps(bad).encode())
    assert status == 400 and body["error"]["param"] == "messages[0].role"
    for field in ("messages[0].role", "temperature", "max_tokens"):
        assert field in body["error"]["message"]
    status, body = post(server, json.dumps({"model": "b"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post(
        server, json.dumps({"model": "b", "messages": [{"role": "user", "content": "a<|im_end|>"}]}).encode()
    )
    assert status == 400 and "special token" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        ask(server.client(), "b", "Hi", n=2)


def test_wrong_or_missing_api_key_is_401(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(server.client(key="sk-wrong"), "b", "Hi")
    assert caught.value.body["code"] == "invalid_api_key"
    assert post(server, json.dumps({"model": "b", "messages": []}).encode(), key=None)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        server.client(key="sk-wrong").models.list()


def test_overload_is_503_and_sigterm_answers_what_was_accepted(tiny_phi3: Path, tmp_path: Path) -> None:
    """--max-queue 1: while one long answer generates, one request may wait and the rest are refused at once.
    SIGTERM then refuses new work but finishes the running answer and the waiting one, and exits 0.
    The key comes from $PHILORA_API_KEY this time."""
    args = ["--model", str(tiny_phi3), "--max-queue", "1", "--max-new-tokens", "200"]
    server = start_server(args, tmp_path / "serve.log", PHILORA_API_KEY=KEY)
    try:
        client = server.client()
        long = ask(client, "base", "Hi", max_tokens=200, stream=True, stream_options={"include_usage": True})
        chunks = [next(long), next(long)]  # the second is generated text: the worker is busy with it now
        outcomes: list[Any] = [None] * 6

        def send(i: int) -> None:
            try:
                outcomes[i] = ask(server.client(), "base", f"Hello {i}", max_tokens=3)
            except openai.APIStatusError as e:
                outcomes[i] = e

        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(isinstance(o, openai.APIStatusError) for o in outcomes) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)  # until all but the queued one are refused
        server.proc.send_signal(signal.SIGTERM)
        chunks += list(long)
        for t in threads:
            t.join()
        assert server.proc.wait(timeout=120) == 0
    finally:
        server.proc.kill()
    refused = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
    answered = [o for o in outcomes if not isinstance(o, openai.APIStatusError)]
    assert len(refused) == 5 and all(e.status_code == 503 and e.body["code"] == "overloaded" for e in refused)
    assert len(answered) == 1 and answered[0].usage.completion_tokens == 3
    assert chunks[-1].usage.completion_tokens == 200
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert "shutting down" in server.log.read_text()


def test_bad_flags_exit_2_before_the_model_loads(
    tiny_phi3: Path, adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert cli.main(["serve", "--base", str(tiny_phi3), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen there" in capsys.readouterr().err
    assert cli.main(["serve", "--adapter", f"x={tmp_path / 'missing'}"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["serve", "--adapter", f"x={adapters['b']}", "--adapter", f"x={adapters['run-a']}"]) == 2
    assert "two adapters are named 'x'" in capsys.readouterr().err
    assert cli.main(["serve", "--max-queue", "0", "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("philora: error:") == 2 and "Traceback" not in err
