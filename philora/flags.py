"""The flags that name what a command reads, with one meaning on every command (the CLI grammar):

    --base M        a base model: a local dir or a hub id (eval, chat, serve, merge, export gguf-lora, data check)
    --adapter DIR   an adapter, or the run dir that holds one (eval, chat, serve, merge, export gguf-lora, push)
    --merged DIR    a merged model dir, `philora merge --output` (export gguf and ollama, push)
    --output PATH   what the command writes

The spellings they replace (`--model`, push's positional DIR, gguf-lora's `--base FILE.gguf`) keep working for one
release with a one-line warning. A command's errors name the flag as the user typed it, so each flag remembers its
spelling on the parsed arguments."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

BASE, ADAPTER, MERGED = "--base", "--adapter", "--merged"
_TYPED = "typed_flags"  # on the parsed Namespace: dest → the spelling the user typed


class Typed(argparse.Action):
    """A flag that stores its value like a plain one and remembers which of its spellings was typed."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        setattr(namespace, self.dest, values)
        remember(namespace, self.dest, option or self.dest)


class Deprecated(Typed):
    """An old spelling of a flag: it still works, and says what replaces it (`use`)."""

    def __init__(self, option_strings: Sequence[str], dest: str, use: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.use = use

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        warn_deprecated(option or self.dest, self.use)
        super().__call__(parser, namespace, values, option)


def warn_deprecated(old: str, new: str) -> None:
    print(f"philora: warning: {old} is deprecated here; use {new}", file=sys.stderr)


def remember(args: argparse.Namespace, dest: str, spelling: str) -> None:
    setattr(args, _TYPED, {**(getattr(args, _TYPED, None) or {}), dest: spelling})


def typed(args: argparse.Namespace, dest: str, default: str) -> str:
    """The flag the user typed for `dest` (an old spelling, if that was used), else `default`."""
    return (getattr(args, _TYPED, None) or {}).get(dest, default)
