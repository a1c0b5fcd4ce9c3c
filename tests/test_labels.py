"""Labels land exactly on the intended tokens, checked against a rendering written out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from philora.config import ModelSection
from philora.data.formats import Conversation, RowProblem
from philora.data.render import IGNORE, ChatEncoder, TemplateError
from philora.data.templates import PHI3_TEMPLATE
from philora.model.load import load_tokenizer

CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris, obviously.", "train": False},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "Spain?"},
    {"role": "assistant", "content": 'Madrid 🇪🇸 {"ok": true}'},
]
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def hand_render(
    messages: list[dict], header: str, end: str, before: str = "", after: str = ""
) -> tuple[str, list[tuple[int, int]]]:
    """A chat written out by hand in a `header`-per-message layout, and the character spans that must be trained:
    each trained answer and its `end` token."""
    text, spans = before, []
    for m in messages:
        text += header.format(role=m["role"])
        start = len(text)
        text += m["content"] + end
        if m["role"] == "assistant" and m.get("train", True):
            spans.append((start, len(text)))
        text += "\n"
    return text + after, spans


def chatml(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """SmolLM2's layout, with the default system prompt it adds when there is none."""
    default = f"<|im_start|>system\n{SMOL_DEFAULT_SYSTEM}<|im_end|>\n" if messages[0]["role"] != "system" else ""
    return hand_render(messages, "<|im_start|>{role}\n", "<|im_end|>", before=default)


def phi3(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The official Phi-3 layout, which ends the chat with eos."""
    return hand_render(messages, "<|{role}|>\n", "<|end|>", after="<|endoftext|>")


def expected_labels(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]]
    return encoded["input_ids"], trained


@pytest.fixture(scope="module")
def smol(tiny_phi3: Path):
    return load_tokenizer(ModelSection(name_or_path=str(tiny_phi3)))


@pytest.fixture(scope="module")
def phi3_tokenizer(phi3_style: Path):
    return load_tokenizer(ModelSection(name_or_path=str(phi3_style)))


@pytest.mark.parametrize("which", ["smol", "phi3"])
def test_labels_match_an_independent_rendering_token_by_token(which: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue("smol" if which == "smol" else "phi3_tokenizer")
    encoder = ChatEncoder(tokenizer)
    layout = chatml if which == "smol" else phi3
    for messages in (CHAT, CHAT[1:], CHAT[1:5]):
        text, spans = layout(messages)
        ids, trained = expected_labels(tokenizer, text, spans)
        sample = encoder.encode(messages)
        assert sample.input_ids.tolist() == ids
        assert (sample.labels != IGNORE).tolist() == trained
        assert all(label in (IGNORE, token) for label, token in zip(sample.labels.tolist(), ids, strict=True))
    end = "<|im_end|>" if which == "smol" else "<|end|>"
    sample = encoder.encode(CHAT)
    assert tokenizer.decode(sample.labels[sample.labels != IGNORE]) == f'Rome.{end}Madrid 🇪🇸 {{"ok": true}}{end}'


def test_phi3_tokenizer_without_a_template_gets_the_official_one(phi3_style: Path, capsys) -> None:
    phi3_tokenizer = load_tokenizer(ModelSection(name_or_path=str(phi3_style)))
    assert phi3_tokenizer.chat_template is None
    encoder = ChatEncoder(phi3_tokenizer)
    assert phi3_tokenizer.chat_template == PHI3_TEMPLATE
    assert "using the official Phi-3 template" in capsys.readouterr().err
    assert phi3_tokenizer.convert_ids_to_tokens(encoder.end_of_turn_id) == "<|end|>"
    assert phi3_tokenizer.pad_token == "<unk>"  # eos was also the pad: a safe one is chosen
    assert set(encoder.stop_ids) == {phi3_tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>")}


@pytest.mark.parametrize("which", ["smol", "phi3"])
def test_direct_render_equals_apply_chat_template(which: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue("smol" if which == "smol" else "phi3_tokenizer")
    encoder = ChatEncoder(tokenizer)
    clean = [{"role": m["role"], "content": m["content"]} for m in CHAT]
    for messages in (clean, clean[1:], clean[:2]):
        for prompt in (False, True):
            reference = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert encoder.render(messages, prompt) == reference


@pytest.mark.parametrize("which", ["smol", "phi3"])
def test_prompt_tails_agree_with_tokenizing_each_whole_prompt(which: str, request: pytest.FixtureRequest) -> None:
    """The encoder tokenizes each prompt only from its last special token; the full prompts must agree."""
    tokenizer = request.getfixturevalue("smol" if which == "smol" else "phi3_tokenizer")
    encoder = ChatEncoder(tokenizer)
    rows = [CHAT, CHAT[1:], [{"role": "user", "content": " leading space"}, {"role": "assistant", "content": "x\n\n"}]]
    for messages in rows:
        sample = encoder.encode(messages)
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or not m.get("train", True):
                continue
            prompt = tokenizer(
                tokenizer.apply_chat_template(clean[:i], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False,
            )["input_ids"]
            assert sample.input_ids[: len(prompt)].tolist() == prompt
            assert sample.labels[len(prompt) - 1] == IGNORE and sample.labels[len(prompt)] != IGNORE


def test_an_answer_that_merges_with_the_prompt_is_refused_with_the_fix(smol) -> None:
    encoder = ChatEncoder(smol)
    merged = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\n\nx"}]
    with pytest.raises(TemplateError, match=r"messages\[1\].content starts with '\\n\\nx', which the tokenizer merges"):
        encoder.encode(merged)


def test_train_on_last_assistant_and_all(smol) -> None:
    encoder = ChatEncoder(smol)
    last = encoder.encode(CHAT, "last_assistant")
    assert smol.decode(last.labels[last.labels != IGNORE]) == 'Madrid 🇪🇸 {"ok": true}<|im_end|>'
    everything = encoder.encode(CHAT, "all")
    assert everything.labels[1:].tolist() == everything.input_ids[1:].tolist() and everything.labels[0] == IGNORE


def test_text_rows_are_trained_everywhere_and_end_with_eos(smol) -> None:
    encoder = ChatEncoder(smol)
    (sample,) = encoder.encode_many([Conversation("x", text="Plain words here.")])
    assert not isinstance(sample, RowProblem)
    assert sample.input_ids[-1] == smol.eos_token_id
    assert sample.labels.tolist() == [IGNORE, *sample.input_ids[1:].tolist()]


def test_a_template_that_is_not_prefix_stable_is_reported(tiny_phi3: Path) -> None:
    tokenizer = load_tokenizer(ModelSection(name_or_path=str(tiny_phi3)))
    # Renders the number of messages up front: every prefix renders differently from the whole.
    tokenizer.chat_template = (
        "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoder = ChatEncoder(tokenizer)
    with pytest.raises(TemplateError, match="not prefix-stable"):
        encoder.encode(CHAT[3:5])


def test_a_template_that_forbids_repeated_roles_names_the_row(tiny_phi3: Path) -> None:
    tokenizer = load_tokenizer(ModelSection(name_or_path=str(tiny_phi3)))
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoder = ChatEncoder(tokenizer)
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(TemplateError, match="refused this conversation: Conversation roles must alternate"):
        encoder.encode(twice)
    assert encoder.encode(twice[1:]).trained > 0
    # The default SmolLM2 template renders repeated roles, so such rows train there.
    assert ChatEncoder(load_tokenizer(ModelSection(name_or_path=str(tiny_phi3)))).encode(twice).trained > 0
