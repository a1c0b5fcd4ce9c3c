"""Config checks with messages a user can act on: types against the dataclass annotations, then values that
cannot work (ranges, combinations)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from philora.config.fields import SECTIONS, Config


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


YAML_BOOL_WORDS = {False: ("no", "false", "off"), True: ("yes", "true", "on")}


def coerce(value: Any, tp: Any) -> Any:
    """Undo two YAML 1.1 surprises where the field says what was meant: `5e-6` (no dot) read as a string where
    a number is expected, and `no`/`off` read as false where a word like "no" is one of the allowed values."""
    if isinstance(value, bool) and not matches(value, tp):
        words = [w for w in YAML_BOOL_WORDS[value] if matches(w, tp)]
        return words[0] if words else value
    if not isinstance(value, str) or matches(value, tp):
        return value
    for kind in (int, float):
        if matches(0 if kind is int else 0.5, tp):
            try:
                return kind(value)
            except ValueError:
                continue
    return value


def check_values(config: Config, place: Callable[[str], str]) -> list[str]:
    """Every value that cannot work, as '<file:line>: section.key: <value> is not allowed; <fix>'."""
    problems = []
    for section in SECTIONS:
        values = getattr(config, section)
        for f in dataclasses.fields(values):
            check, value, key = f.metadata.get("check"), getattr(values, f.name), f"{section}.{f.name}"
            if check is not None and not check(value):
                problems.append(f"{place(key)}: {key}: {value!r} is not allowed; {f.metadata['fix']}")
    t, d = config.training_config, config.data
    if t.bf16 and t.fp16:
        problems.append(f"{place('training_config.fp16')}: training_config.bf16/fp16: both true; choose one")
    if d.train is not None and d.eval is None:
        for key, on in (("predict_with_generate", t.predict_with_generate), ("do_eval", t.do_eval),
                        ("eval_strategy", t.eval_strategy != "no")):  # fmt: skip
            if on:
                problems.append(f"{place('training_config.' + key)}: training_config.{key}: needs eval data; "
                                "set data.eval to a file or a fraction of train")  # fmt: skip
    for key, on in (("load_best_model_at_end", t.load_best_model_at_end),
                    ("early_stopping_patience", t.early_stopping_patience is not None)):  # fmt: skip
        if on and t.eval_strategy == "no":
            problems.append(f"{place('training_config.' + key)}: training_config.{key}: needs evaluations during "
                            "training to choose from; set training_config.eval_strategy: steps (with eval_steps) or "
                            "epoch")  # fmt: skip
    types = [t.loss_type] if isinstance(t.loss_type, str) else t.loss_type
    if t.loss_weights is not None and len(t.loss_weights) != len(types):
        problems.append(f"{place('training_config.loss_weights')}: training_config.loss_weights: {len(t.loss_weights)} "
                        f"weights for {len(types)} loss types; give one weight per loss_type")  # fmt: skip
    if t.loss_type != "sigmoid" and t.method != "dpo":
        problems.append(f"{place('training_config.loss_type')}: training_config.loss_type: {t.loss_type!r} is "
                        f"a dpo loss, and method is {t.method}; set method: dpo, or remove loss_type")  # fmt: skip
    if d.train is None and isinstance(d.eval, float):
        problems.append(f"{place('data.eval')}: data.eval: a fraction needs data.train; the sample dataset has "
                        "its own eval split")  # fmt: skip
    return problems
