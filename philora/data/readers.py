"""Read chat conversations from files, naming every bad row by file:line.

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": str}`; an assistant
message may carry `"train": false` to keep it out of the loss. Rows that cannot be used are collected as
one-line problems; the caller decides whether they stop the run (`on_bad_row: error`) or are skipped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from philora.errors import UserError

ROLES = ("system", "user", "assistant")
MESSAGES_EXAMPLE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    source: str  # file:line


@dataclass
class ReadResult:
    conversations: list[Conversation] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line per rejected row


def read_jsonl(path: Path) -> ReadResult:
    """Read an OpenAI-`messages` JSONL file. Blank lines are not rows; a UTF-8 BOM is tolerated."""
    if path.is_dir() or path.suffix not in (".jsonl", ".json"):
        raise UserError(f"{path}: philora reads .jsonl files of chat messages here ({MESSAGES_EXAMPLE} per line)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the data file ({e.strerror or e})") from None
    result = ReadResult()
    lines = raw.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            result.problems.append(
                f"{where}: invalid UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1}); save the file as UTF-8"
            )
            continue
        except json.JSONDecodeError as e:
            result.problems.append(
                f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
            )
            continue
        problem = check_messages_row(row)
        if problem:
            result.problems.append(f"{where}: {problem}")
        else:
            result.conversations.append(Conversation(row["messages"], where))
    if not result.conversations and not result.problems:
        raise UserError(f"{path}: the file has no rows; expected one {MESSAGES_EXAMPLE} per line")
    return result


def check_messages_row(row: Any) -> str | None:
    """What is wrong with one row in `messages` format, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object like {MESSAGES_EXAMPLE}, got a {type(row).__name__}"
    if "messages" not in row:
        return f"no 'messages' key (keys: {', '.join(map(str, row)) or 'none'}); expected {MESSAGES_EXAMPLE}"
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] is a {type(m).__name__}; expected an object with role and content"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            what = "missing" if "content" not in m else f"a {type(content).__name__}"
            return f"messages[{i}].content is {what}; it must be a string"
        if not content.strip():
            return f"messages[{i}].content is empty; remove the message or give it text"
        if "train" in m and not isinstance(m["train"], bool):
            return f"messages[{i}].train is {m['train']!r}; use true or false"
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        return f"a system message at position {roles.index('system', 1)}; only the first message may be system"
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns or turns[0] != "user":
        return "the first non-system message must be from the user"
    for i in range(1, len(turns)):
        if turns[i] == turns[i - 1]:
            position = i + len(roles) - len(turns)
            return f"two {turns[i]} messages in a row at position {position}; alternate user and assistant"
    if "assistant" not in turns:
        return "no assistant message; nothing to learn from this row"
    return None
