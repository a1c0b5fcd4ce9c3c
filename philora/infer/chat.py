"""`philora chat`: a multi-turn chat in the terminal, answers streamed as they are generated.

Lines are read from stdin one at a time, so a pipe works as well as a terminal; each line is a turn. A message of
several lines is one turn when it stands between two lines that are `\"\"\"` alone, or, in a terminal, when it is
pasted (lines that arrive together). `/reset` clears the history (the system prompt stays), `/exit`, `/quit` or
end of input quit. Ctrl-C stops an answer; at the prompt it quits.
The conversation is rendered with the model's chat template each turn, the same rendering training used.
"""

from __future__ import annotations

import argparse
import dataclasses
import select
import sys
from collections.abc import Callable
from typing import Any, TextIO

from philora.data.render import ChatEncoder
from philora.errors import UserError
from philora.infer.generation import BadPrompt, Completion, Settings, complete

PROMPT = ">>> "
CONTINUED = "... "
BLOCK = '"""'  # a line of just this opens and closes a multi-line message
PASTE_GAP = 0.05  # seconds: lines that follow each other closer than this in a terminal were pasted together
HELP = "/reset clears the history, /exit quits"
FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p"}


class Session:
    """The conversation so far and how to answer it."""

    def __init__(self, model: Any, encoder: ChatEncoder, settings: Settings, system: str | None = None) -> None:
        self.model, self.encoder, self.settings, self.system = model, encoder, settings, system
        self.messages: list[dict[str, str]] = []
        self.turns = 0
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, on_text: Callable[[str], None]) -> Completion:
        """Answer `text` after the history; the turn joins the history only once the answer is complete
        (an interrupted or refused turn leaves no trace)."""
        settings = self.settings
        if settings.seed is not None:  # reproducible sessions that do not repeat one random stream each turn
            settings = dataclasses.replace(settings, seed=settings.seed + self.turns)
        question = {"role": "user", "content": text}
        result = complete(self.model, self.encoder, [*self.messages, question], settings, on_text)
        self.messages += [question, {"role": "assistant", "content": result.text.strip()}]
        self.turns += 1
        return result


class Printer:
    """Writes an answer as it streams, without the whitespace the model may start it with."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.started = out, False

    def __call__(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.out.write(text)
            self.out.flush()


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
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("philora: history cleared", file=sys.stderr, flush=True)
        elif text.startswith("/") and " " not in text:
            print(f"philora: unknown command {text}; {HELP}", file=sys.stderr, flush=True)
        elif text:
            answer(session, text, out)


def answer(session: Session, text: str, out: TextIO) -> None:
    try:
        result = session.ask(text, Printer(out))
    except BadPrompt as e:
        print(f"philora: {e}", file=sys.stderr, flush=True)
        return
    except KeyboardInterrupt:
        out.write("\n")
        print("philora: answer interrupted; it is not kept in the history", file=sys.stderr, flush=True)
        return
    out.write("\n")
    out.flush()
    if result.finish_reason == "length":
        limit = session.settings.max_new_tokens
        print(f"philora: the answer was cut at --max-new-tokens {limit}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    from philora.infer.adapters import load, read_adapter

    settings = Settings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    if problems := settings.problems(FLAGS):
        raise UserError(*problems)
    adapters = [read_adapter(args.adapter)] if args.adapter else []
    model, tokenizer = load(adapters, args.model, args.dtype)
    session = Session(model, ChatEncoder(tokenizer), settings, args.system)
    what = f"adapter {adapters[0].path}" if adapters else "the base model"
    print(f"philora: chatting with {what}; {HELP}", file=sys.stderr, flush=True)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    return repl(session, sys.stdin, sys.stdout)
