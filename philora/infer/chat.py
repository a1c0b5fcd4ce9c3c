"""`philora chat`: a multi-turn chat in the terminal, answers streamed as they are generated.

Lines are read from stdin one at a time, so a pipe works as well as a terminal; each line is a turn. A message of
several lines is one turn when it stands between two lines that are `\"\"\"` alone, or, in a terminal, when it is
pasted (lines that arrive together). `/reset` clears the history (the system prompt stays); `/exit`, `/quit`,
`exit` or `quit` alone (any case) or end of input quit. Ctrl-C stops an answer; at the prompt it quits.
The conversation is rendered with the model's chat template each turn, the same rendering training used.

With `--tools FILE` (OpenAI function schemas), the model may answer with calls: each is shown as
`→ name({arguments})`, and you give its result at the `name> ` prompt (you play the tool); the model then answers
with the results in front of it, or calls again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import select
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from philora.data.render import ChatEncoder
from philora.data.tools import BadTools, Syntax, check_tools
from philora.errors import UserError
from philora.flags import BASE, typed
from philora.infer.generation import BadPrompt, Completion, Settings, complete
from philora.infer.tool_calls import CallStream

PROMPT = ">>> "
CONTINUED = "... "
BLOCK = '"""'  # a line of just this opens and closes a multi-line message
PASTE_GAP = 0.05  # seconds: lines that follow each other closer than this in a terminal were pasted together
HELP = "/reset clears the history, /exit (or exit, quit) quits"
# what leaves the chat when it is the whole message, in any case: typing `exit` is how people try to leave a REPL
EXIT_WORDS = ("/exit", "/quit", "exit", "quit")
FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p", "seed": "--seed"}


MAX_CALL_ROUNDS = 4  # answers in a row that may call tools before the turn goes back to the user


class Session:
    """The conversation so far and how to answer it."""

    def __init__(
        self,
        model: Any,
        encoder: ChatEncoder,
        settings: Settings,
        system: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> None:
        self.model, self.encoder, self.settings, self.system, self.tools = model, encoder, settings, system, tools
        self.messages: list[dict[str, Any]] = []
        self.turns = 0
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, on_text: Callable[[str], None]) -> Completion:
        """Answer `text` after the history; the turn joins the history only once the answer is complete
        (an interrupted or refused turn leaves no trace)."""
        return self._answer([{"role": "user", "content": text}], on_text)

    def give_results(self, results: list[str], on_text: Callable[[str], None]) -> Completion:
        """Answer the last answer's calls with their results, one per call in order."""
        calls = self.messages[-1]["tool_calls"]
        turn = [
            {"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"], "content": r}
            for c, r in zip(calls, results, strict=True)
        ]
        return self._answer(turn, on_text)

    @property
    def call_syntax(self) -> Syntax | None:
        """How an answer's tool calls are written; None when no tools are offered."""
        return self.encoder.tool_syntax if self.tools else None

    @property
    def pending_calls(self) -> list[dict[str, Any]]:
        """The calls of the last answer, waiting for their results."""
        return self.messages[-1].get("tool_calls", []) if self.messages else []

    def _answer(self, new: list[dict[str, Any]], on_text: Callable[[str], None]) -> Completion:
        settings = self.settings
        if settings.seed is not None:  # reproducible sessions that do not repeat one random stream each turn
            settings = dataclasses.replace(settings, seed=settings.seed + self.turns)
        result = complete(self.model, self.encoder, [*self.messages, *new], settings, on_text, self.tools)
        syntax = self.encoder.tool_syntax
        content, calls = syntax.parse(result.text) if self.tools and syntax else (result.text.strip(), [])
        answer: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            answer["tool_calls"] = [
                {"id": f"call_{self.turns}_{k}", "type": "function", "function": c} for k, c in enumerate(calls)
            ]
        self.messages += [*new, answer]
        self.turns += 1
        return result


class Printer:
    """Writes an answer as it streams, without the whitespace the model may start it with, and, where tools are
    offered, without the text of its calls (CallStream holds it back), which are shown as calls once it is done."""

    def __init__(self, out: TextIO, syntax: Syntax | None = None) -> None:
        self.out, self.started = out, False
        self.calls = CallStream(syntax) if syntax is not None else None
        self.shown = False

    def __call__(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if self.calls is not None:
            text = self.calls.feed(text)
        if text:
            self.out.write(text)
            self.out.flush()
            self.shown = True


def read_line(stdin: TextIO, out: TextIO, prompt: str = PROMPT) -> str | None:
    """The next line, or None at end of input. A terminal gets line editing through `input()`."""
    if is_terminal(stdin):
        try:
            return input(prompt)
        except EOFError:
            return None
    out.write(prompt)
    out.flush()
    line = stdin.readline()
    return line.rstrip("\r\n") if line else None


def read_message(stdin: TextIO, out: TextIO) -> str | None:
    """The next message: one line; the lines between two `\"\"\"` lines; or in a terminal, the lines of one paste.
    None at end of input (a block left open at the end is the message)."""
    first = read_line(stdin, out)
    if first is None or first.strip() != BLOCK:
        lines = [] if first is None else [first]
        while lines and pasted_more(stdin) and (line := read_line(stdin, out, "")) is not None:
            lines.append(line)
        return "\n".join(lines) if lines else None
    lines = []
    while (line := read_line(stdin, out, CONTINUED)) is not None and line.strip() != BLOCK:
        lines.append(line)
    return "\n".join(lines)


def is_terminal(stdin: TextIO) -> bool:
    return stdin is sys.stdin and stdin.isatty()


def pasted_more(stdin: TextIO) -> bool:
    """In a terminal: another line is already waiting, so this one came in the same paste."""
    return is_terminal(stdin) and bool(select.select([stdin], [], [], PASTE_GAP)[0])


def repl(session: Session, stdin: TextIO, out: TextIO) -> int:
    """Read, answer, repeat until /exit or end of input."""
    while True:
        try:
            message = read_message(stdin, out)
        except KeyboardInterrupt:
            message = None
        if message is None:
            out.write("\n")
            return 0
        text = message.strip()
        if text.lower() in EXIT_WORDS:
            return 0
        if text == "/reset":
            session.reset()
            print("philora: history cleared", file=sys.stderr, flush=True)
        elif text.startswith("/") and " " not in text:
            print(f"philora: unknown command {text}; {HELP}", file=sys.stderr, flush=True)
        elif text:
            answer(session, text, out, stdin)


def answer(session: Session, text: str, out: TextIO, stdin: TextIO | None = None) -> None:
    """Answer a message; where the answer calls tools, ask for their results (from `stdin`) and answer again,
    up to MAX_CALL_ROUNDS answers in a row."""
    results: list[str] | None = None
    for _ in range(MAX_CALL_ROUNDS):
        if not respond(session, out, text, results):
            return
        calls = session.pending_calls
        if not calls or stdin is None:
            return
        given = [read_result(stdin, out, call["function"]["name"]) for call in calls]
        if any(r is None for r in given):  # end of input
            return
        results = [r or "" for r in given]
    print(f"philora: {MAX_CALL_ROUNDS} answers in a row made calls; your turn", file=sys.stderr, flush=True)


def respond(session: Session, out: TextIO, text: str, results: list[str] | None) -> bool:
    """One answer to `text` (or, given `results`, to the last answer's calls), streamed, with its calls shown as
    `→ name({arguments})`; False where there is none (refused or interrupted)."""
    printer = Printer(out, session.call_syntax)
    try:
        result = session.ask(text, printer) if results is None else session.give_results(results, printer)
    except BadPrompt as e:
        print(f"philora: {e}", file=sys.stderr, flush=True)
        return False
    except KeyboardInterrupt:
        out.write("\n")
        print("philora: answer interrupted; it is not kept in the history", file=sys.stderr, flush=True)
        return False
    calls = [f"→ {c['function']['name']}({json.dumps(c['function']['arguments'])})" for c in session.pending_calls]
    if calls:
        out.write(("\n" if printer.shown else "") + "\n".join(calls))
    out.write("\n")
    out.flush()
    if result.finish_reason == "length":
        limit = session.settings.max_new_tokens
        print(f"philora: the answer was cut at --max-new-tokens {limit}", file=sys.stderr, flush=True)
    return True


def read_result(stdin: TextIO, out: TextIO, name: str) -> str | None:
    """A tool's result, typed (or pasted, or between \"\"\" lines) at the `name> ` prompt."""
    first = read_line(stdin, out, f"{name}> ")
    if first is None or first.strip() != BLOCK:
        return first
    lines = []
    while (line := read_line(stdin, out, CONTINUED)) is not None and line.strip() != BLOCK:
        lines.append(line)
    return "\n".join(lines)


def read_tools(path: str) -> list[dict[str, Any]]:
    """--tools FILE: a JSON list of function schemas, or an object with one under "tools"."""
    try:
        value = json.loads(Path(path).expanduser().read_text())
    except OSError as e:
        raise UserError(f"--tools {path}: cannot read it: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--tools {path}: not valid JSON ({e.msg} at line {e.lineno}); give a list of tools") from None
    try:
        return check_tools(value["tools"] if isinstance(value, dict) and "tools" in value else value, "tools")
    except BadTools as e:
        raise UserError(f"--tools {path}: {e}") from None


def main(args: argparse.Namespace) -> int:
    from philora.infer.adapters import load, read_adapter

    settings = Settings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    if problems := settings.problems(FLAGS):
        raise UserError(*problems)
    tools = read_tools(args.tools) if args.tools else None
    adapters = [read_adapter(args.adapter)] if args.adapter else []
    model, tokenizer = load(adapters, args.base, args.dtype, args.trust_remote_code, typed(args, "base", BASE))
    encoder = ChatEncoder(tokenizer)
    if tools:
        encoder.use_tools()
    session = Session(model, encoder, settings, args.system, tools)
    what = f"adapter {adapters[0].path}" if adapters else "the base model"
    print(f"philora: chatting with {what}; {HELP}", file=sys.stderr, flush=True)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    return repl(session, sys.stdin, sys.stdout)
