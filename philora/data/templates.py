"""The chat templates philora brings, and how a template takes tools and reasoning.

- PHI3_TEMPLATE: the official Phi-3/Phi-3.5 one, for Phi-3 tokenizers saved without a template.
- CHATML_TOOLS: tools for a ChatML template that has none (SmolLM2's), wrapping the model's own.
- `tool_style`: whether and how a template renders tools; `for_template`: messages and tools put where it reads
  them (Phi-4-mini's template reads the schemas from its system message and never renders `tool_calls`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from philora.data.tools import PHI4

# The official Phi-3/Phi-3.5-mini-instruct chat template, for Phi-3 tokenizers saved without one.
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>")

# Tools for a ChatML template that has none (SmolLM2's): conversations with tools are written the way ChatML tool
# models (Hermes, Qwen2.5) write them: the schemas in the system turn between <tools></tools>, each call as JSON
# between <tool_call></tool_call>, each result in a `tool` turn between <tool_response></tool_response>.
# Conversations without tools go through the model's own template (CHATML_OWN), so they render as before.
CHATML_TOOLS = (
    "{%- if tools %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system + 'You can call functions. Their signatures, as JSON, are between "
    "<tools></tools>:\\n<tools>\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- '</tools>\\nTo call functions, answer with one JSON object per call, each between <tool_call></tool_call>:"
    '\\n<tool_call>\\n{\\"name\\": <function name>, \\"arguments\\": <arguments as a JSON object>}\\n'
    "</tool_call><|im_end|>\\n' }}"
    "{%- for message in turns %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{- '<|im_start|>assistant\\n' }}{%- if message['content'] %}{{- message['content'] + '\\n' }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}"
    "{{- '<tool_call>\\n' + {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson"
    " + '\\n</tool_call>' }}{%- if not loop.last %}{{- '\\n' }}{%- endif %}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>tool\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    "{%- else %}CHATML_OWN{%- endif %}"
)
PHI4_SYSTEM = "You are a helpful assistant with some tools."  # Phi-4-mini's documented example, when a row has none
THINK_START, THINK_END = "<think>", "</think>"  # a reasoning block, as reasoning models write it


def for_template(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, phi4: bool, reads_reasoning: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages and tools as a template takes them: reasoning written into the content as a <think> block where
    the template does not read reasoning_content itself; for Phi-4-mini (`phi4`), the tools as JSON in the system
    message and the calls written into the answers; for the others, the tools as the `tools` variable."""
    if not reads_reasoning and any("reasoning_content" in m for m in messages):
        messages = [_inline_reasoning(m) if "reasoning_content" in m else m for m in messages]
    if not phi4:
        return messages, tools or None
    result = [dict(m) for m in messages]
    if tools:
        if result[0]["role"] != "system":
            result.insert(0, {"role": "system", "content": PHI4_SYSTEM})
        result[0]["tools"] = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    for m in result:
        if m.get("tool_calls"):
            m["content"] = PHI4.answer(m.get("content") or "", m.pop("tool_calls"))
    return result, None


def _inline_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    result = {k: v for k, v in message.items() if k != "reasoning_content"}
    result["content"] = f"{THINK_START}\n{message['reasoning_content'].strip()}\n{THINK_END}\n\n{message['content']}"
    return result


def has_reasoning(message: dict[str, Any]) -> bool:
    return "reasoning_content" in message or message["content"].lstrip().startswith(THINK_START)


def tool_style(source: str | None) -> str | None:
    """How a template takes tools: "phi4" (Phi-4-mini: JSON in the system message's `tools`, calls written in
    the content), "native" (it renders `tools` and `tool_calls` itself; "native-hermes" when it writes calls in
    <tool_call> tags), "chatml" (a ChatML template without tools, which philora's CHATML_TOOLS can wrap), or None."""
    if not source:
        return None
    if re.search(r"message(\['tools'\]|\[\"tools\"\]|\.tools)", source):
        return "phi4"
    if re.search(r"\btools\b", source) and "tool_calls" in source:
        return "native-hermes" if "<tool_call>" in source else "native"
    if "<|im_start|>" in source:
        return "chatml"
    return None
