"""An Ollama `Modelfile` for an exported GGUF: the chat template in Go template syntax, stop tokens, defaults.

A Jinja chat template cannot be translated in general, but the templates of chat models are almost always
"each message is prefix[role] + content + suffix[role], then the assistant's prompt". That shape is read off the
model's own template by rendering conversations with marker contents and cutting the glue between messages just
after the end-of-turn token (`<|im_end|>\\n` | `<|im_start|>user\\n`). A system prompt the template inserts by
itself when none is given becomes the Modelfile's SYSTEM. The shape is then checked: re-assembled, it must give
exactly the template's own text for several conversations, or the export is refused rather than shipped with a
template that differs from the one the model was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from philora.errors import UserError

Render = Callable[[list[dict[str, str]], bool], str]
MARKS = {"system": "MARKSYSTEM", "user": "MARKUSERONE", "assistant": "MARKASSISTANT", "user2": "MARKUSERTWO"}
ROLES = ("system", "user", "assistant")
DEFAULT_CONTEXT = 4096  # Ollama's num_ctx when the model allows it: longer costs memory on every request


@dataclass
class ChatShape:
    start: str  # before the first message (a bos some templates write)
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str  # after the last message when the assistant is to answer
    default_system: str | None  # the system prompt the template adds when a conversation has none

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the Go template renders for `messages` (Ollama adds SYSTEM when there is no system message)."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages)
        return self.start + body + (self.generation if messages[-1]["role"] != "assistant" else "")

    def go_template(self) -> str:
        branches = "{{ else if ".join(
            f'eq .Role "{role}" }}}}{self.prefix[role]}{{{{ .Content }}}}{self.suffix[role]}' for role in ROLES
        )
        return (
            f"{self.start}{{{{ range $i, $_ := .Messages }}}}{{{{ $last := eq (len (slice $.Messages $i)) 1 }}}}"
            f"{{{{ if {branches}{{{{ end }}}}"
            f'{{{{ if and $last (ne .Role "assistant") }}}}{self.generation}{{{{ end }}}}{{{{ end }}}}'
        )


def chat_shape(render: Render, end_of_turn: str) -> ChatShape:
    """The per-role prefix/suffix form of a chat template, verified against the template itself."""
    s, u, a, u2 = (MARKS[k] for k in ("system", "user", "assistant", "user2"))
    with_system = render(_conversation(s, u, a, u2), True)
    without = render(_conversation(None, u, a, u2), True)
    cuts = _between(with_system, [s, u, a, u2])
    sys_suffix, user_prefix = _split_turn(cuts[1], end_of_turn)
    user_suffix, assistant_prefix = _split_turn(cuts[2], end_of_turn)
    assistant_suffix, again = _split_turn(cuts[3], end_of_turn)
    if again != user_prefix or not cuts[4].startswith(user_suffix):
        raise _unexpressible("user turns are not written the same way each time")
    head = _between(without, [u, a, u2])[0]
    if not head.endswith(user_prefix):
        raise _unexpressible("the first user turn is written differently")
    start, default_system = head[: len(head) - len(user_prefix)], None
    if start.startswith(cuts[0]) and start != cuts[0] and start.endswith(sys_suffix):
        # The template added a system message of its own: start + sys_prefix + DEFAULT + sys_suffix.
        default_system, start = start[len(cuts[0]) : len(start) - len(sys_suffix)], ""
    if not cuts[0].startswith(start):
        raise _unexpressible("the text before the first message depends on its role")
    shape = ChatShape(
        start=start,
        prefix={"system": cuts[0][len(start) :], "user": user_prefix, "assistant": assistant_prefix},
        suffix={"system": sys_suffix, "user": user_suffix, "assistant": assistant_suffix},
        generation=cuts[4][len(user_suffix) :],
        default_system=default_system,
    )
    _check(shape, render)
    return shape


def _conversation(system: str | None, user: str, assistant: str, user2: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [
        *messages,
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
        {"role": "user", "content": user2},
    ]


def _between(text: str, marks: list[str]) -> list[str]:
    """The text before, between and after the marks, which must appear once each and in order."""
    pieces, rest = [], text
    for mark in marks:
        if rest.count(mark) != 1:
            raise _unexpressible("it does not write each message's content exactly once")
        before, rest = rest.split(mark)
        pieces.append(before)
    return [*pieces, rest]


def _split_turn(glue: str, end_of_turn: str) -> tuple[str, str]:
    """Glue between two messages → (the first's suffix, the second's prefix), cut after the end-of-turn token
    and the line breaks that follow it."""
    at = glue.find(end_of_turn)
    if at < 0:
        raise _unexpressible(f"no {end_of_turn} between messages")
    cut = at + len(end_of_turn)
    while cut < len(glue) and glue[cut] == "\n":
        cut += 1
    return glue[:cut], glue[cut:]


def _check(shape: ChatShape, render: Render) -> None:
    s, u, a, u2 = (MARKS[k] for k in ("system", "user", "assistant", "user2"))
    cases = [
        [{"role": "user", "content": u}],
        [{"role": "system", "content": s}, {"role": "user", "content": u}],
        _conversation(s, u, a, u2),
        _conversation(None, u, a, u2),
        _conversation(None, "Hi there", "Hello!\n", "2+2?"),
    ]
    for messages in cases:
        if shape.render(messages) != render(messages, True):
            raise _unexpressible("the prefix/suffix form does not reproduce it")
    pieces = [shape.start, shape.generation, *shape.prefix.values(), *shape.suffix.values(), shape.default_system or ""]
    if any("{{" in p or '"""' in p for p in pieces):
        raise _unexpressible('its markers contain {{ or """')


def _unexpressible(why: str) -> UserError:
    return UserError(
        f"the chat template cannot be written as an Ollama TEMPLATE ({why}); use `philora export gguf` — the GGUF "
        "carries the chat template — and write the Modelfile's TEMPLATE by hand"
    )


def modelfile(shape: ChatShape, gguf_name: str, stops: list[str], context: int, source: str) -> str:
    """The Modelfile text: FROM, TEMPLATE, SYSTEM (when the template has a default), stops and num_ctx."""
    lines = [
        f"# Written by `philora export ollama` from {source}.",
        "# Create the model with: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{shape.go_template()}"""',
    ]
    if shape.default_system is not None:
        lines.append(f'SYSTEM """{shape.default_system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    lines.append(f"PARAMETER num_ctx {min(context, DEFAULT_CONTEXT)}")
    return "\n".join(lines) + "\n"
