"""Row formats: detect which one a source holds, and turn each row into a conversation or a problem.

Formats (field names can be remapped with `data.columns`, e.g. `{prompt: question, completion: answer}`):
- messages: `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "...", "train": false?}],
  "tools"?: [...]}`; with tools (OpenAI function schemas), assistant messages may carry `tool_calls` (content
  then optional) and `tool` messages give the results (`tool_call_id`, `name` optional): see tools.py. An
  assistant message may carry its reasoning in `reasoning_content` (or a <think> block at the start of content)
- sharegpt: `{"conversations": [{"from": "system"|"human"|"gpt"|"function_call"|"observation", "value": "..."}],
  "system"?: "...", "tools"?: "..."}`: a function_call turn is an assistant turn of calls (its value the JSON of
  one `{"name", "arguments"}` or a list of them), an observation the tool results (a JSON list: one per call)
- alpaca: `{"instruction": "...", "input"?: "...", "output": "...", "system"?: "...", "history"?: [[q, a]]}`;
  the user turn is the instruction, then a blank line and the input when there is one
- prompt_completion: `{"prompt": ..., "completion": ...}`, each a string (one user / one assistant message) or a
  list of messages; only the completion is trained
- preference: `{"prompt": ..., "chosen": ..., "rejected": ...}`, the prompt a string or a list of messages, each
  answer a string or a list holding one assistant message; or `{"chosen": [messages], "rejected": [messages]}`,
  two conversations that differ only in their last (assistant) message. For dpo and orpo: the chosen answer is
  the conversation's, the rejected one is kept beside it
- text: `{"text": "..."}`, plain text trained on every token, no chat template
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from philora.data.sources import BadRow, Part
from philora.data.tools import (
    BadTools,
    check_calls,
    check_results,
    check_tools,
    sharegpt_calls,
    sharegpt_results,
)
from philora.errors import UserError

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "preference", "text")
REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("chosen", "rejected"),
    "text": ("text",),
}
OPTIONAL = {  # the other columns each format reads
    "messages": ("tools",),
    "sharegpt": ("system", "tools"),
    "alpaca": ("input", "system", "history"),
    "prompt_completion": (),
    "preference": ("prompt",),
    "text": (),
}
INNER_FIELDS = ("role", "content", "from", "value")  # keys inside each message, not columns
LIST_FIELDS = ("messages", "conversations", "history")
EITHER_FIELDS = ("prompt", "completion", "chosen", "rejected")  # a string or a list of messages
# in declaration order (a set's order would change from run to run, and with it every message that lists them)
COLUMN_FIELDS = tuple(dict.fromkeys(f for table in (REQUIRED, OPTIONAL) for fields in table.values() for f in fields))
FIELDS = (*COLUMN_FIELDS, *INNER_FIELDS)
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
EXAMPLES = {
    "messages": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "sharegpt": '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}',
    "alpaca": '{"instruction": "...", "input": "", "output": "..."}',
    "prompt_completion": '{"prompt": "...", "completion": "..."}',
    "preference": '{"prompt": "...", "chosen": "...", "rejected": "..."}',
    "text": '{"text": "..."}',
}


EITHER = "a string or a non-empty list of messages"


class RowProblem(ValueError):
    """What is wrong with one row, said so that the user can fix it."""


@dataclass
class Conversation:
    source: str  # file:line
    messages: list[dict[str, Any]] | None = None  # role, content, and train: false where an answer is not trained
    tools: list[dict[str, Any]] | None = None  # the function schemas the conversation offers (tools.py)
    text: str | None = None  # the text format: no template, every token trained
    rejected: dict[str, Any] | None = None  # a preference pair: the rejected answer instead of messages[-1]

    @property
    def sides(self) -> list[list[dict[str, Any]]]:
        """The conversations to encode: the row's, and for a preference pair also the rejected one."""
        assert self.messages is not None
        return [self.messages] if self.rejected is None else [self.messages, [*self.messages[:-1], self.rejected]]


class Columns:
    """philora's field names mapped to the user's (`data.columns`)."""

    def __init__(self, mapping: dict[str, str] | None) -> None:
        unknown = sorted(set(mapping or {}) - set(FIELDS))
        if unknown:
            raise UserError(
                f"data.columns: unknown field {', '.join(map(repr, unknown))}; map any of {', '.join(FIELDS)} "
                "to your column names, e.g. {prompt: question, completion: answer}"
            )
        self.mapping = dict(mapping or {})

    def __getitem__(self, name: str) -> str:
        return self.mapping.get(name, name)


def detect(part: Part, columns: Columns) -> str:
    """The format of one file, from the keys of its first object row."""
    first = next((row for row in part.rows if isinstance(row.value, dict)), None)
    if first is None:
        return "messages"  # every row is already a problem; they are reported as such
    keys = set(first.value)
    for fmt, required in REQUIRED.items():
        if all(columns[f] in keys for f in required):
            return fmt
    check_mapped(part, COLUMN_FIELDS, columns)  # a mapping to a column that is not there is why none matched
    raise UserError(
        f"{first.where}: cannot tell the data format from this row's keys ({', '.join(sorted(keys)) or 'none'}); "
        "set data.format to one of " + ", ".join(FORMATS) + ", and map your field names with data.columns "
        "(e.g. data.columns: {prompt: question, completion: answer})"
    )


def check_mapped(part: Part, fields: tuple[str, ...], columns: Columns) -> None:
    """Each column data.columns names for one of `fields` must be in the file: a typo there is said as such."""
    have = column_names(part)
    problems = [
        f"data.columns.{name}: there is no column {column!r} in {part.name}; its columns are: "
        + (", ".join(have) or "none")
        for name, column in columns.mapping.items()
        if name in fields and column not in have
    ]
    if problems:
        raise UserError(*problems)


def column_names(part: Part) -> list[str]:
    """A table's columns, or the keys of a file of objects (every row's, first seen first), in file order."""
    if part.columns is not None:
        return list(part.columns)
    return list(dict.fromkeys(key for row in part.rows if isinstance(row.value, dict) for key in row.value))


def check_columns(part: Part, fmt: str, columns: Columns) -> None:
    """Columns named in data.columns must be there; a table (CSV, parquet, datasets) must have the format's columns,
    with types that can hold them."""
    check_mapped(part, (*REQUIRED[fmt], *OPTIONAL[fmt]), columns)
    if part.columns is None:
        return
    have = ", ".join(sorted(part.columns)) or "none"
    missing = [columns[f] for f in REQUIRED[fmt] if columns[f] not in part.columns]
    if missing:
        raise UserError(
            f"{part.name}: no column {', '.join(map(repr, missing))} (columns: {have}); the {fmt} format needs "
            f"{', '.join(columns[f] for f in REQUIRED[fmt])}; rename them, map them with data.columns, "
            "or set data.format"
        )
    for name in (*REQUIRED[fmt], "input", "system", "history"):
        kind = part.columns.get(columns[name])
        wanted = ("list", "string") if name in LIST_FIELDS or name in EITHER_FIELDS else ("string",)
        if kind is not None and kind not in wanted and kind != "null":
            what = "a list of messages (or JSON text of one)" if "list" in wanted else "text"
            raise UserError(f"{part.name}: column {columns[name]!r} holds {kind}; the {fmt} format needs {what}")


def to_conversation(value: Any, where: str, fmt: str, columns: Columns) -> Conversation:
    """One row as a conversation; raises RowProblem naming what to fix."""
    if isinstance(value, BadRow):
        raise RowProblem(value.reason)
    if not isinstance(value, dict):
        raise RowProblem(f"expected a JSON object like {EXAMPLES[fmt]}, got a {type(value).__name__}")
    for name in REQUIRED[fmt]:
        if columns[name] not in value:
            keys = ", ".join(map(str, value)) or "none"
            raise RowProblem(f"no {columns[name]!r} key (keys: {keys}); expected {EXAMPLES[fmt]}")
    if fmt == "text":
        return Conversation(where, text=_text(value, columns["text"], allow_blank=False))
    if fmt == "preference":
        return _preference(value, where, columns)
    tools = _tools(value, columns) if fmt in ("messages", "sharegpt") else []
    field = "conversations" if fmt == "sharegpt" else "messages"
    try:
        messages = {
            "messages": _messages,
            "sharegpt": _sharegpt,
            "alpaca": _alpaca,
            "prompt_completion": _prompt_completion,
        }[fmt](value, columns, tools)
        check_results(messages, field)
    except BadTools as e:
        raise RowProblem(str(e)) from None
    check_turns(messages, field)
    return Conversation(where, messages=messages, tools=tools or None)


def _tools(row: dict[str, Any], columns: Columns) -> list[dict[str, Any]]:
    value = row.get(columns["tools"])
    if value is None or value == "" or value == []:
        return []
    try:
        return check_tools(value, columns["tools"])
    except BadTools as e:
        raise RowProblem(str(e)) from None


def _text(row: dict[str, Any], key: str, allow_blank: bool = True) -> str:
    value = row.get(key)
    if value is None and allow_blank:
        return ""
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}"
        raise RowProblem(f"{key!r} is {what}; it must be a string")
    if not allow_blank and not value.strip():
        raise RowProblem(f"{key!r} is empty; give it text or remove the row")
    return value


def _list(row: dict[str, Any], key: str, what: str = "a non-empty list of messages") -> list[Any]:
    value = row.get(key)
    if isinstance(value, str) and value.lstrip().startswith("["):  # CSV cells and string columns hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowProblem(f"{key!r} holds text that is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, list):
        raise RowProblem(f"{key!r} is a {type(value).__name__}; use {what}")
    if not value:
        raise RowProblem(f"{key!r} must be {what}")
    return value


def _messages(
    row: dict[str, Any],
    columns: Columns,
    tools: list[dict[str, Any]] | None = None,
    key: str = "messages",
    what: str = "a non-empty list of messages",
) -> list[dict[str, Any]]:
    field, role_key, content_key = columns[key], columns["role"], columns["content"]
    result = []
    for i, m in enumerate(_list(row, field, what)):
        if not isinstance(m, dict):
            raise RowProblem(f"{field}[{i}] is a {type(m).__name__}; expected an object with role and content")
        role = m.get(role_key)
        if role not in ROLES:
            raise RowProblem(f"{field}[{i}].{role_key} is {role!r}; use one of {', '.join(ROLES)}")
        place = f"{field}[{i}]"
        calls = None
        if m.get("tool_calls") not in (None, []):
            if role != "assistant":
                raise RowProblem(f"{place} is a {role} message with tool_calls; only assistant messages make calls")
            calls = check_calls(m["tool_calls"], f"{place}.tool_calls", tools or [], i)
        message = _message(m, place, role, content_key, optional=calls is not None)
        if calls:
            message["tool_calls"] = calls
        if role == "tool":
            for name in ("tool_call_id", "name"):
                if m.get(name) is not None:
                    message[name] = str(m[name])
        result.append(message)
    return result


def _message(m: dict[str, Any], place: str, role: str, content_key: str, optional: bool = False) -> dict[str, Any]:
    """One message's text (a tool result given as JSON is kept as its JSON text), its reasoning, its train flag.
    `optional`: an assistant message of tool calls, which needs no text."""
    content = m.get(content_key)
    if role == "tool" and isinstance(content, (dict, list)):
        content = json.dumps(content, ensure_ascii=False)
    if content is None and optional:
        content = ""
    if not isinstance(content, str):
        what = "missing" if content_key not in m else f"a {type(content).__name__}"
        raise RowProblem(f"{place}.{content_key} is {what}; it must be a string")
    if not content.strip() and not optional and role != "tool":
        raise RowProblem(f"{place}.{content_key} is empty; remove the message or give it text")
    message: dict[str, Any] = {"role": role, "content": content}
    reasoning = m.get("reasoning_content")
    if reasoning is not None:
        if role != "assistant" or not isinstance(reasoning, str):
            raise RowProblem(f"{place}.reasoning_content must be a string on an assistant message")
        if reasoning.strip():
            message["reasoning_content"] = reasoning
    if "train" in m:
        if not isinstance(m["train"], bool):
            raise RowProblem(f"{place}.train is {m['train']!r}; use true or false")
        if role != "assistant" and not m["train"]:
            raise RowProblem(f"{place}.train is false on a {role} message; only assistant messages are trained")
        message["train"] = m["train"]
    return message


def _sharegpt(row: dict[str, Any], columns: Columns, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    field, from_key, value_key = columns["conversations"], columns["from"], columns["value"]
    result = []
    system = _text(row, columns["system"])
    if system.strip():
        result.append({"role": "system", "content": system})
    for i, m in enumerate(_list(row, field)):
        if not isinstance(m, dict):
            raise RowProblem(f"{field}[{i}] is a {type(m).__name__}; expected an object with from and value")
        speaker, place = m.get(from_key), f"{field}[{i}]"
        if speaker not in SHAREGPT_ROLES:
            raise RowProblem(
                f"{place}.{from_key} is {speaker!r}; use one of system, human, gpt, function_call, observation "
                "(or user, assistant, tool)"
            )
        if speaker == "function_call":
            calls = sharegpt_calls(m.get(value_key), f"{place}.{value_key}", tools, i)
            result.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif speaker == "observation":
            calls = result[-1].get("tool_calls", []) if result else []
            result += sharegpt_results(m.get(value_key), calls, f"{place}.{value_key}")
        else:
            result.append(_message(m, place, SHAREGPT_ROLES[speaker], value_key))
    return result


def _alpaca(row: dict[str, Any], columns: Columns, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    instruction = _text(row, columns["instruction"], allow_blank=False)
    extra = _text(row, columns["input"])
    output = _text(row, columns["output"], allow_blank=False)
    system = _text(row, columns["system"])
    result = [{"role": "system", "content": system}] if system.strip() else []
    history = row.get(columns["history"])
    for i, pair in enumerate(_list(row, columns["history"]) if history else []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise RowProblem(f"{columns['history']}[{i}] must be a [question, answer] pair of strings")
        result += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [*result, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _prompt_completion(row: dict[str, Any], columns: Columns, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return _prompt(row, columns) + _answer(row, columns, "completion")


def _answer(row: dict[str, Any], columns: Columns, key: str) -> list[dict[str, Any]]:
    """A prompt_completion or preference answer: a string, or a list of assistant messages."""
    field = columns[key]
    if _plain_text(row[field]):
        return [{"role": "assistant", "content": _text(row, field, allow_blank=False)}]
    answer = _messages(row, columns, None, key, EITHER)
    if any(m["role"] != "assistant" for m in answer):
        raise RowProblem(f"{field!r} may only hold assistant messages; move the others into the prompt")
    return answer


def _plain_text(value: Any) -> bool:
    """A string that is text, not the JSON of a message list (which CSV cells and string columns hold)."""
    if not isinstance(value, str):
        return False
    if not value.lstrip().startswith("["):
        return True
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return True  # text that happens to start with "["
    return not (isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed))


def _preference(row: dict[str, Any], where: str, columns: Columns) -> Conversation:
    """A pair: the prompt with the chosen answer as the conversation, and the rejected answer beside it."""
    chosen_key, rejected_key, prompt_key = columns["chosen"], columns["rejected"], columns["prompt"]
    if prompt_key in row:
        prompt = _prompt(row, columns)
        chosen, rejected = _answer(row, columns, "chosen"), _answer(row, columns, "rejected")
        for key, answer in ((chosen_key, chosen), (rejected_key, rejected)):
            if len(answer) != 1:
                raise RowProblem(f"{key!r} holds {len(answer)} messages; give the one final assistant answer")
    else:  # two whole conversations with a shared prefix
        chosen, rejected = _messages(row, columns, None, "chosen"), _messages(row, columns, None, "rejected")
        prompt = chosen[:-1]
        for key, side in ((chosen_key, chosen), (rejected_key, rejected)):
            if side[-1]["role"] != "assistant":
                raise RowProblem(f"{key!r} must end with the assistant answer being compared")
        if rejected[:-1] != prompt:
            at = next((i for i, (a, b) in enumerate(zip(prompt, rejected[:-1], strict=False)) if a != b), None)
            where_differs = f"at message {at}" if at is not None else "in length"
            raise RowProblem(
                f"{chosen_key!r} and {rejected_key!r} differ {where_differs} before their last message; a pair "
                "compares two answers to one prompt, so everything before the answers must be the same"
            )
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise RowProblem(f"{chosen_key!r} and {rejected_key!r} are the same answer; a pair needs two different ones")
    messages = [{**m, "train": False} if m["role"] == "assistant" else m for m in prompt] + chosen[-1:]
    check_turns(messages, "prompt")
    return Conversation(where, messages=messages, rejected=rejected[-1])


def _prompt(row: dict[str, Any], columns: Columns) -> list[dict[str, Any]]:
    """A prompt_completion or preference prompt: a string (one user message) or a list of messages."""
    key = columns["prompt"]
    if _plain_text(row[key]):
        return [{"role": "user", "content": _text(row, key, allow_blank=False)}]
    prompt = _messages(row, columns, None, "prompt", EITHER)
    return [{**m, "train": False} if m["role"] == "assistant" else m for m in prompt]


def check_turns(messages: list[dict[str, Any]], field: str = "messages") -> None:
    """The order rules every chat template relies on. Repeated roles are left to the template to accept."""
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        raise RowProblem(
            f"a system message at {field}[{roles.index('system', 1)}]; only the first message may be system"
        )
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns or turns[0] != "user":
        raise RowProblem("the first non-system message must be from the user")
    if "assistant" not in turns:
        raise RowProblem("no assistant message; nothing to learn from this row")
