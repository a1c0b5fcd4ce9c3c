"""Tool calling in the data: formats, masks through each kind of template, call syntax, and the eval scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from philora.data.formats import Columns, RowProblem, to_conversation
from philora.data.render import IGNORE, ChatEncoder
from philora.data.tools import HERMES, PHI4, BadTools, check_calls, check_tools
from philora.errors import UserError
from philora.eval.metrics import tool_scores

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
ROW = {
    "tools": [WEATHER, TIME],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo and Lima?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lima"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "b", "content": "rain"},
        {"role": "tool", "tool_call_id": "a", "content": {"sky": "sun"}},
        {"role": "assistant", "content": "Oslo: sun. Lima: rain."},
    ],
}


def conversation(row: dict, fmt: str = "messages"):
    return to_conversation(row, "data.jsonl:1", fmt, Columns(None))


def encoder_of(path: Path) -> ChatEncoder:
    from transformers import AutoTokenizer

    return ChatEncoder(AutoTokenizer.from_pretrained(path))


def trained_text(encoder: ChatEncoder, sample) -> list[str]:
    """The trained stretches of a sample, decoded with their special tokens."""
    runs, current = [], []
    for token, label in zip(sample.input_ids.tolist(), sample.labels.tolist(), strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [encoder.tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def test_rows_with_tools_are_put_in_openai_shape() -> None:
    row = conversation(ROW)
    assert [t["function"]["name"] for t in row.tools] == ["get_weather", "get_time"]  # a bare function is wrapped
    calls = row.messages[2]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == [{"city": "Oslo"}, {"city": "Lima"}]  # JSON text parsed
    assert row.messages[2]["content"] == ""
    # results matched to their calls by id, in any order, and given the call's function name
    assert [(m["tool_call_id"], m["name"]) for m in row.messages[3:5]] == [("b", "get_weather"), ("a", "get_weather")]
    assert row.messages[4]["content"] == '{"sky": "sun"}'  # a result given as JSON is kept as its JSON text


def test_sharegpt_function_call_and_observation_are_the_same_conversation() -> None:
    sharegpt = {
        "system": "Be brief.",
        "tools": json.dumps([WEATHER["function"], TIME]),  # LLaMA-Factory's column: JSON text of bare functions
        "conversations": [
            {"from": "human", "value": "Weather in Oslo and Lima?"},
            {"from": "function_call", "value": json.dumps([
                {"name": "get_weather", "arguments": {"city": "Oslo"}},
                {"name": "get_weather", "arguments": {"city": "Lima"}}])},
            {"from": "observation", "value": json.dumps(["sun", "rain"])},
            {"from": "gpt", "value": "Oslo: sun. Lima: rain."},
        ],
    }  # fmt: skip
    row = conversation(sharegpt, "sharegpt")
    assert row.tools == conversation(ROW).tools
    roles = [m["role"] for m in row.messages]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert [c["function"]["name"] for c in row.messages[2]["tool_calls"]] == ["get_weather", "get_weather"]
    assert [(m["tool_call_id"], m["content"]) for m in row.messages[3:5]] == [("call_1_0", "sun"), ("call_1_1", "rain")]


def test_chatml_masks_train_calls_and_answers_not_schemas_or_results(embedded_tokenizer: Path) -> None:
    encoder = encoder_of(embedded_tokenizer)
    with pytest.raises(RowProblem, match="cannot render them yet"):
        encoder.encode(conversation(ROW).messages, tools=conversation(ROW).tools)
    encoder.use_tools()
    row = conversation(ROW)
    sample = encoder.encode(row.messages, tools=row.tools)
    calls = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call><|im_end|>'
    )
    assert trained_text(encoder, sample) == [calls, "Oslo: sun. Lima: rain.<|im_end|>"]
    text = encoder.tokenizer.decode(sample.input_ids.tolist(), skip_special_tokens=False)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert "<|im_start|>tool\n<tool_response>\nrain\n</tool_response><|im_end|>" in text
    # what the model learns to write is what the call syntax reads back
    assert HERMES.parse(calls.removesuffix("<|im_end|>")) == (
        "",
        [
            {"name": "get_weather", "arguments": {"city": "Oslo"}},
            {"name": "get_weather", "arguments": {"city": "Lima"}},
        ],
    )
    # without tools, the wrapped template renders exactly as the model's own
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert encoder.render(plain) == encoder_of(embedded_tokenizer).render(plain)


def test_phi4_mini_template_trains_its_call_tokens_token_by_token(phi4_mini_tokenizer: Path) -> None:
    encoder = encoder_of(phi4_mini_tokenizer)
    assert encoder.tool_style == "phi4" and encoder.tool_syntax is PHI4
    encoder.use_tools()  # nothing to change: the template takes tools in the system message
    row = conversation(ROW)
    sample = encoder.encode(row.messages, tools=row.tools)
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    tokens = encoder.tokenizer.convert_ids_to_tokens(ids)
    table = [(i, t, label != IGNORE) for i, t, label in zip(ids, tokens, labels, strict=True)]
    start = ids.index(200025)  # <|tool_call|>, at its id in Phi-4-mini
    answer = table[start : ids.index(200020, start) + 1]
    print(
        "\n".join(f"{i:>7} {t!r:24} {'trained' if on else '-'}" for i, t, on in table[start - 3 : start + len(answer)])
    )
    assert table[start - 1][:2] == (200019, "<|assistant|>") and not table[start - 1][2]
    assert answer[0][:2] == (200025, "<|tool_call|>") and answer[-2][:2] == (200026, "<|/tool_call|>")
    assert answer[-1][:2] == (200020, "<|end|>")
    assert all(on for _, _, on in answer)  # the call, its markers and the end of turn: every token trained
    # tools in the system turn between <|tool|> and <|/tool|>, results in <|tool|> turns: none trained
    assert ids[:1] == [200022] and 200023 in ids[:5]
    assert not any(on for i, _, on in table[: ids.index(200024) + 1])
    text = encoder.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith('<|system|>Be brief.<|tool|>[{"name": "get_weather", "description": "Weather in a city."')
    assert "<|end|><|tool|>rain<|end|><|tool|>" in text
    assert trained_text(encoder, sample) == [
        '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
        '{"name": "get_weather", "arguments": {"city": "Lima"}}]<|/tool_call|><|end|>',
        "Oslo: sun. Lima: rain.<|end|>",
    ]
    # a row with tools and no system message gets Phi-4-mini's documented one
    bare = {"tools": [WEATHER], "messages": ROW["messages"][1:3]}
    assert encoder.render(conversation(bare).messages, tools=conversation(bare).tools).startswith(
        "<|system|>You are a helpful assistant with some tools.<|tool|>["
    )


def test_a_template_that_cannot_render_tools_is_an_error_naming_the_fix(phi3_style: Path) -> None:
    encoder = encoder_of(phi3_style)  # the official Phi-3 template: no tools
    assert encoder.tool_syntax is None
    with pytest.raises(UserError, match=r"cannot render tools .* use a model whose template does"):
        encoder.use_tools()


def test_special_tokens_inside_calls_or_schemas_are_refused(phi4_mini_tokenizer: Path) -> None:
    encoder = encoder_of(phi4_mini_tokenizer)
    row = conversation(ROW)
    row.messages[2]["tool_calls"][0]["function"]["arguments"] = {"city": "<|end|>"}
    with pytest.raises(RowProblem, match=r"messages\[2\].tool_calls contains '<\|end\|>'"):
        encoder.encode(row.messages, tools=row.tools)


def test_call_syntax_reads_calls_and_leaves_other_text_as_content() -> None:
    assert HERMES.parse('Sure.\n<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>') == (
        "Sure.",
        [{"name": "f", "arguments": {"x": 1}}],
    )
    assert HERMES.parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert HERMES.parse('<tool_call>\n{"name": "f", "arguments": {}}') == ("", [{"name": "f", "arguments": {}}])
    assert PHI4.parse('<|tool_call|>[{"name": "f", "arguments": {"a": [1]}}]<|/tool_call|>') == (
        "",
        [{"name": "f", "arguments": {"a": [1]}}],
    )
    assert PHI4.parse("no call here") == ("no call here", [])


def test_tools_and_calls_are_checked_against_each_other() -> None:
    tools = check_tools([WEATHER])
    with pytest.raises(BadTools, match="defined twice"):
        check_tools([WEATHER, WEATHER])
    with pytest.raises(BadTools, match=r"tools\[0\]\.function\.parameters is a list"):
        check_tools([{"type": "function", "function": {"name": "f", "parameters": []}}])
    with pytest.raises(BadTools, match="lacks required argument 'city'"):
        check_calls([{"function": {"name": "get_weather", "arguments": {}}}], "m", tools)
    with pytest.raises(BadTools, match="must be a JSON object"):
        check_calls([{"function": {"name": "get_weather", "arguments": "[1]"}}], "m", tools)
    assert check_calls([{"name": "get_weather", "arguments": {"city": "X"}}], "m", tools, 3)[0]["id"] == "call_3_0"


def test_tool_scores_count_valid_calls_names_arguments_and_restraint() -> None:
    tools = check_tools([WEATHER, TIME])
    call = HERMES.write
    oslo = [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    references = [call(oslo), call(oslo), call(oslo), call(oslo), "Hello!", "Hello!"]
    predictions = [
        call(oslo),  # right
        call([{"function": {"name": "get_weather", "arguments": {"city": "Lima"}}}]),  # right name, wrong argument
        call([{"function": {"name": "get_time", "arguments": {"city": "Oslo"}}}]),  # wrong function
        "It is sunny in Oslo.",  # no call
        "Hi!",  # rightly no call
        call(oslo),  # a call where none was needed
    ]
    scores = tool_scores(predictions, references, [tools] * 6, HERMES)
    assert scores == {
        "tool_valid_call": 0.75,
        "tool_name": 0.5,
        "tool_arguments": 0.25,
        "tool_no_call": 0.5,
        "tool_decision": 4 / 6,  # three of four calls made, one of two rightly not
    }
    # a model that never calls avoids every needless call, and decides right only where none is needed
    never = tool_scores(["It is sunny."] * 4 + ["Hi!"] * 2, references, [tools] * 6, HERMES)
    assert never["tool_no_call"] == 1 and never["tool_decision"] == 2 / 6 and never["tool_valid_call"] == 0


# A ChatML template that, like Qwen3's, shows an answer's reasoning only after the last user message.
DROPS_EARLIER_REASONING = (
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}{%- if m['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_user and m['reasoning_content'] %}"
    "{{- '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
THINKING = {
    "messages": [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "reasoning_content": "Two plus three is five.", "content": "5"},
        {"role": "user", "content": "Times 4?"},
        {"role": "assistant", "reasoning_content": "Five times four is twenty.", "content": "20"},
    ]
}


def encoded(encoder: ChatEncoder, row: dict, reasoning: bool) -> list:
    from philora.data.encode import encode_all

    (outcome,) = encode_all([conversation(row)], encoder, ("assistant", 512, "truncate", reasoning), 1)
    assert outcome.problem is None, outcome.problem
    return outcome.samples


@pytest.mark.parametrize("reasoning", [True, False])
def test_reasoning_is_written_as_a_think_block_and_trained_or_not(embedded_tokenizer: Path, reasoning: bool) -> None:
    encoder = encoder_of(embedded_tokenizer)  # SmolLM2's template has no reasoning_content: philora writes <think>
    inline = {"messages": [THINKING["messages"][0], {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n5"}]}
    (field,), (block,) = (
        encoded(encoder, {"messages": THINKING["messages"][:2]}, reasoning),
        encoded(encoder, inline, reasoning),
    )
    text = encoder.tokenizer.decode(field.input_ids.tolist(), skip_special_tokens=False)
    assert "<|im_start|>assistant\n<think>\nTwo plus three is five.\n</think>\n\n5<|im_end|>" in text
    if reasoning:
        assert trained_text(encoder, field) == ["<think>\nTwo plus three is five.\n</think>\n\n5<|im_end|>"]
        assert trained_text(encoder, block) == ["<think>\nEasy.\n</think>\n\n5<|im_end|>"]
    else:  # in the text, without loss: the answer after </think> is what is learned
        assert [t.strip() for t in trained_text(encoder, field)] == ["5<|im_end|>"]
        assert [t.strip() for t in trained_text(encoder, block)] == ["5<|im_end|>"]


@pytest.mark.parametrize("reasoning", [True, False])
def test_a_template_that_drops_earlier_reasoning_gets_each_answer_as_it_renders_it(
    embedded_tokenizer: Path, reasoning: bool
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer)
    tokenizer.chat_template = DROPS_EARLIER_REASONING
    encoder = ChatEncoder(tokenizer)
    first, second = encoded(encoder, THINKING, reasoning)  # one sample per answer, not a rejected row
    texts = [encoder.tokenizer.decode(s.input_ids.tolist(), skip_special_tokens=False) for s in (first, second)]
    assert texts[0].endswith("<|im_start|>assistant\n<think>\nTwo plus three is five.\n</think>\n\n5<|im_end|>\n")
    # the second answer follows the first as the template shows it then: without its reasoning, and not trained
    assert "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nTimes 4?" in texts[1]
    assert texts[1].endswith("<think>\nFive times four is twenty.\n</think>\n\n20<|im_end|>\n")
    if reasoning:
        assert trained_text(encoder, first) == ["<think>\nTwo plus three is five.\n</think>\n\n5<|im_end|>"]
        assert trained_text(encoder, second) == ["<think>\nFive times four is twenty.\n</think>\n\n20<|im_end|>"]
    else:
        assert [t.strip() for t in trained_text(encoder, second)] == ["20<|im_end|>"]
    # a conversation without reasoning stays one sample under this template
    plain = {"messages": [{k: v for k, v in m.items() if k != "reasoning_content"} for m in THINKING["messages"]]}
    assert len(encoded(encoder, plain, reasoning)) == 1


def test_eval_reports_tool_scores_base_beside_fine_tuned() -> None:
    from philora.eval import metrics, table

    tools = check_tools([WEATHER])
    oslo = HERMES.write([{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}])
    prompts = [
        ([{"role": "user", "content": "Oslo?"}], oslo, tools),
        ([{"role": "user", "content": "Hi"}], "Hi!", tools),
    ]
    evaluation = metrics.compare(prompts, {"before": ["It rains.", oslo], "after": [oslo, "Hi!"]}, HERMES)
    assert evaluation["before"]["tool_valid_call"] == 0 and evaluation["after"]["tool_valid_call"] == 1
    assert evaluation["before"]["tool_no_call"] == 0 and evaluation["after"]["tool_no_call"] == 1
    assert evaluation["samples"][0]["tools"] == tools
    evaluation["loss"] = {}
    text = table.format_comparison(evaluation)
    for label in ("valid calls", "call names", "call arguments", "no call needed", "call or not"):
        assert any(line.split()[: len(label.split())] == label.split() and "+100.0 pts" in line for line in
                   text.splitlines()), text  # fmt: skip
    # without tools, no tool rows
    assert "tool_name" not in metrics.compare([(prompts[1][0], "Hi!", None)], {"after": ["Hi!"]}, HERMES)["after"]
