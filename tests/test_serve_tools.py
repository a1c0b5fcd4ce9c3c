"""`philora serve`'s tool calling, request size limit and API docs, against a real server (FastAPI, uvicorn, the
worker, the token loop, the tokenizer and chat template) whose model is scripted: a tiny random model cannot
write a valid call, so a stand-in model puts all its logit weight on the next token of a scripted answer, and
every answer goes through the real token loop and Detokenizer. Driven by the official openai client.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import ScriptedModel

from philora.infer.app import Api
from philora.infer.openai_api import ApiError, ChatCompletionRequest, chat_request
from philora.infer.serve import Limits, Shutdown, bind, run, serving_encoder
from philora.infer.tool_calls import tool_use
from philora.infer.worker import Worker

KEY = "sk-test-tools"
MAX_BODY = 4 << 20
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@dataclass
class Scripted:
    model: ScriptedModel
    url: str  # http://127.0.0.1:PORT/v1

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=KEY, max_retries=0, timeout=30)

    def ask(self, answer: str | None, messages: list[Any] = ASK, **kwargs: Any) -> Any:
        """The reply to `messages` when the model answers `answer` (None: the request must not reach it)."""
        if answer is not None:
            self.model.script(answer)
        return self.client().chat.completions.create(model="scripted", messages=messages, **kwargs)

    def prompt(self) -> str:
        """The last prompt the model was given, as text."""
        return self.model.encoder.tokenizer.decode(self.model.prompts[-1])


def scripted_server(tokenizer: Any) -> Iterator[Scripted]:
    """philora serve's own run() in a thread, on a port of its own, until the tests are done."""
    encoder = serving_encoder(tokenizer)
    model = ScriptedModel(encoder)
    api = Api("scripted", [], Worker(model, encoder, max_queue=4), KEY, max_new_tokens=128)
    sock, shutdown = bind("127.0.0.1", 0), Shutdown()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=run, args=(api, sock, Limits(max_body=MAX_BODY), shutdown))
    thread.start()
    try:
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            assert r.status == 200
        yield Scripted(model, url + "/v1")
        assert not model.answers, "a scripted answer was left unused"
    finally:
        shutdown.stop.set()
        thread.join(timeout=60)


@pytest.fixture(scope="module")
def chatml(embedded_tokenizer: Path) -> Iterator[Scripted]:
    """SmolLM2's ChatML template, which has no tools: serve gives it philora's (Hermes-style <tool_call>)."""
    from transformers import AutoTokenizer

    yield from scripted_server(AutoTokenizer.from_pretrained(embedded_tokenizer))


@pytest.fixture(scope="module")
def phi4(phi4_mini_tokenizer: Path) -> Iterator[Scripted]:
    """Phi-4-mini's template and tool tokens at their ids: `<|tool_call|>` and `<|/tool_call|>` are special tokens."""
    from transformers import AutoTokenizer

    yield from scripted_server(AutoTokenizer.from_pretrained(phi4_mini_tokenizer))


def reassembled(chunks: list[Any]) -> tuple[str, list[dict[str, str]], str]:
    """(content, calls, finish_reason) of a stream, put together as a client does from its deltas."""
    content, calls, finish = "", {}, ""
    for chunk in chunks:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[k] for k in sorted(calls)], finish


def calls_of(message: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_an_answer_with_a_call_is_returned_as_tool_calls(chatml: Scripted) -> None:
    reply = chatml.ask("I will look it up.\n" + CALL, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will look it up."
    assert calls_of(choice.message) == [("get_weather", {"city": "Paris"})]
    assert choice.message.tool_calls[0].id.startswith("call_") and choice.message.tool_calls[0].type == "function"
    assert reply.usage.completion_tokens == len(chatml.model.encoder.tokenize(["I will look it up.\n" + CALL])[0])
    prompt = chatml.prompt()
    assert "<tools>" in prompt and json.dumps(WEATHER) in prompt and prompt.endswith("<|im_start|>assistant\n")
    alone = chatml.ask(CALL, tools=[WEATHER]).choices[0].message
    assert alone.content is None and calls_of(alone) == [("get_weather", {"city": "Paris"})]


def test_the_tool_result_goes_back_into_the_prompt(chatml: Scripted) -> None:
    called = chatml.ask(CALL, tools=[WEATHER]).choices[0].message
    result = {"role": "tool", "tool_call_id": called.tool_calls[0].id, "content": "22 C and sunny"}
    reply = chatml.ask("It is 22 C and sunny in Paris.", [*ASK, called, result], tools=[WEATHER])
    assert reply.choices[0].message.content == "It is 22 C and sunny in Paris."
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"
    prompt = chatml.prompt()
    assert f"<|im_start|>assistant\n{CALL}<|im_end|>" in prompt
    assert "<|im_start|>tool\n<tool_response>\n22 C and sunny\n</tool_response><|im_end|>" in prompt


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name", "miss"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function", "dict"),
        ({"tools": WEATHER}, "tools", "valid list"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "defined twice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "'f'"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"messages": [*ASK, {"role": "tool", "content": "22 C"}]}, "messages", "no call before it"),
        ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]},
         "messages[1].tool_calls", "'f'"),
    ],
)  # fmt: skip
def test_tools_that_do_not_fit_are_400_naming_the_field(
    chatml: Scripted, change: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chatml.ask(None, **{"messages": ASK, **change})
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"].startswith(param) and words in error["message"]
    assert error["type"] == "invalid_request_error"


def test_streamed_calls_add_up_to_the_answer(chatml: Scripted) -> None:
    answer = "Both, then.\n" + CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    whole = chatml.ask(answer, tools=[WEATHER, TIME]).choices[0]
    chunks = list(chatml.ask(answer, tools=[WEATHER, TIME], stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert not any("<" in (c.choices[0].delta.content or "") for c in chunks)  # the calls never show as text
    content, calls, finish = reassembled(chunks)
    assert content == whole.message.content == "Both, then." and finish == whole.finish_reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == calls_of(whole.message)
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)


def test_text_that_is_not_a_valid_call_is_content(chatml: Scripted) -> None:
    for answer in ("<tool_call>not json</tool_call>", 'Use <tool_call>{"arguments": {}}</tool_call> then'):
        reply = chatml.ask(answer, tools=[WEATHER]).choices[0]
        assert reply.message.content == answer and reply.message.tool_calls is None and reply.finish_reason == "stop"
        assert reassembled(list(chatml.ask(answer, tools=[WEATHER], stream=True))) == (answer, [], "stop")


def test_tool_choice_none_required_and_named(chatml: Scripted) -> None:
    plain = chatml.ask(CALL, tools=[WEATHER], tool_choice="none").choices[0]
    assert plain.message.content == CALL and plain.message.tool_calls is None and "<tools>" not in chatml.prompt()

    rest = CALL.removeprefix("<tool_call>")
    required = chatml.ask(rest, tools=[WEATHER, TIME], tool_choice="required").choices[0]
    assert chatml.prompt().endswith("<|im_start|>assistant\n<tool_call>")
    assert calls_of(required.message) == [("get_weather", {"city": "Paris"})] and required.message.content is None

    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = chatml.ask('{"city": "Paris"}}\n</tool_call>', tools=[WEATHER, TIME], tool_choice=named).choices[0]
    assert chatml.prompt().endswith('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": ')
    assert calls_of(reply.message) == [("get_weather", {"city": "Paris"})] and reply.finish_reason == "tool_calls"
    streamed = reassembled(list(chatml.ask('{"city": "Paris"}}', tools=[WEATHER], tool_choice=named, stream=True)))
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed[1]] == [("get_weather", {"city": "Paris"})]


def test_phi4_calls_are_special_tokens_kept_in_the_answer(phi4: Scripted) -> None:
    call = '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>'
    ids = phi4.model.encoder.tokenize([call])[0]
    assert ids[0] in phi4.model.encoder.special_ids and ids[-1] in phi4.model.encoder.special_ids
    reply = phi4.ask(call, tools=[WEATHER]).choices[0]
    assert calls_of(reply.message) == [("get_weather", {"city": "Paris"})] and reply.finish_reason == "tool_calls"
    assert f"<|system|>You are a helpful assistant with some tools.<|tool|>[{json.dumps(WEATHER['function'])}]" in (
        phi4.prompt()
    )
    streamed = reassembled(list(phi4.ask(call, tools=[WEATHER], stream=True)))
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed[1]] == calls_of(reply.message)

    named = {"type": "function", "function": {"name": "get_weather"}}
    phi4.ask('{"city": "Paris"}}]<|/tool_call|>', tools=[WEATHER], tool_choice=named)
    assert phi4.prompt().endswith('<|assistant|><|tool_call|>[{"name": "get_weather", "arguments": ')
    without = phi4.ask(call, tools=[WEATHER], tool_choice="none").choices[0].message  # special tokens dropped
    assert without.content == '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'


def raw_request(url: str, head: str, pieces: Iterator[bytes]) -> tuple[int, dict[str, Any], int]:
    """Send a request by hand, its body piece by piece until the server answers; (status, body, bytes sent)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(head.encode())
        sent = 0
        for piece in pieces:
            if select.select([conn], [], [], 0)[0]:  # the server has answered: stop sending
                break
            conn.sendall(piece)
            sent += len(piece)
        response = http.client.HTTPResponse(conn)
        response.begin()
        return response.status, json.loads(response.read()), sent


HEAD = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def test_a_body_over_the_limit_is_413_before_it_is_read(chatml: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    """Told by its Content-Length, the server answers before a byte of the body is sent; sent in chunks, it
    answers once 4 MB have come. Sent whole by the openai client, the 413 reaches it. Nothing is tokenized."""
    tokenized: list[Any] = []
    tokenize = chatml.model.encoder.tokenize
    monkeypatch.setattr(chatml.model.encoder, "tokenize", lambda *a, **k: tokenized.append(a) or tokenize(*a, **k))
    status, body, _ = raw_request(chatml.url, HEAD + f"Content-Length: {10 << 20}\r\n\r\n", iter([]))
    assert status == 413 and body["error"]["code"] == "request_too_large"

    piece = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))  # 160 of these are 10 MB
    status, body, sent = raw_request(chatml.url, HEAD + "Transfer-Encoding: chunked\r\n\r\n", iter([piece] * 160))
    assert status == 413 and MAX_BODY < sent < 10 << 20

    with pytest.raises(openai.APIStatusError) as caught:
        chatml.ask(None, [{"role": "user", "content": "x" * (10 << 20)}])
    assert caught.value.status_code == 413 and "--max-body-mb" in caught.value.body["message"]
    assert tokenized == []


def test_the_api_is_described_at_docs(chatml: Scripted) -> None:
    root, key = chatml.url.removesuffix("/v1"), {"Authorization": f"Bearer {KEY}"}
    with urllib.request.urlopen(urllib.request.Request(root + "/docs", headers=key), timeout=30) as r:
        assert r.status == 200 and b"swagger" in r.read().lower()
    with urllib.request.urlopen(urllib.request.Request(root + "/openapi.json", headers=key), timeout=30) as r:
        spec = json.loads(r.read())
    assert {"/v1/chat/completions", "/v1/models", "/health"} <= set(spec["paths"])
    assert {"tools", "tool_choice", "messages"} <= set(
        spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    )


def test_tools_for_a_template_that_cannot_render_them_are_400(phi3_style: Path) -> None:
    """Phi-3's template reads no tools and is no ChatML one that philora's could wrap."""
    from transformers import AutoTokenizer

    encoder = serving_encoder(AutoTokenizer.from_pretrained(phi3_style))
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": ASK, "tools": [WEATHER]})
    with pytest.raises(ApiError) as caught:
        tool_use(encoder, chat_request(body, 16))
    assert caught.value.status_code == 400 and caught.value.param == "tools" and "cannot render" in caught.value.detail
    assert tool_use(encoder, chat_request(body.model_copy(update={"tools": None}), 16)) is None
