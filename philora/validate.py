"""Type checks for config values against their dataclass annotations, with messages a user can act on."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union


def describe(tp: Any) -> str:
    """`int | None` -> 'an integer or null'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join("null" if a is None else str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is list:
        return f"a list of {describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        return "a mapping"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def matches(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


def check_type(value: Any, tp: Any) -> str | None:
    """None when `value` fits `tp`, else 'expected <what>, got <value>'."""
    return None if matches(value, tp) else f"expected {describe(tp)}, got {value!r}"


def coerce_numeric(value: Any, tp: Any) -> Any:
    """YAML 1.1 reads `5e-6` (no dot) as a string; take such strings as numbers where a number is expected."""
    if not isinstance(value, str) or matches(value, tp):
        return value
    for kind in (int, float):
        if matches(0 if kind is int else 0.5, tp):
            try:
                return kind(value)
            except ValueError:
                continue
    return value
