"""Config checks with messages a user can act on: types against the dataclass annotations, then values that
cannot work (ranges, combinations)."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Union

if TYPE_CHECKING:
    from philora.config.fields import Config


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


REPORTERS = ("none", "tensorboard", "wandb", "mlflow")

# (section.key, test, fix) for values that have the right type but cannot work.
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("peft_config.r", lambda v: v >= 1, "use a rank >= 1 (8-64 is typical)"),
    ("peft_config.lora_alpha", lambda v: v > 0, "use a positive value (often 2*r)"),
    ("peft_config.lora_dropout", lambda v: 0 <= v < 1, "use a value in [0, 1)"),
    ("peft_config.target_modules", lambda v: v in ("all-linear", "attention", "mlp", "qv")
     or (isinstance(v, list) and len(v) > 0), "use all-linear, attention, mlp, qv or a non-empty list of module names"),
    ("training_config.learning_rate", lambda v: v > 0, "use a positive value"),
    ("training_config.num_train_epochs", lambda v: v > 0, "use a positive value"),
    ("training_config.max_steps", lambda v: v == -1 or v >= 1, "use -1 (derive from epochs) or >= 1"),
    ("training_config.per_device_train_batch_size", lambda v: v >= 1, "use a value >= 1"),
    ("training_config.per_device_eval_batch_size", lambda v: v >= 1, "use a value >= 1"),
    ("training_config.gradient_accumulation_steps", lambda v: v >= 1, "use a value >= 1"),
    ("training_config.gradient_checkpointing_layers", lambda v: 0 < v <= 1, "use a fraction in (0, 1]"),
    ("training_config.logging_steps", lambda v: v >= 1, "use a value >= 1"),
    ("training_config.save_steps", lambda v: v >= 1, "use a value >= 1"),
    ("training_config.eval_steps", lambda v: v is None or v >= 1, "use a value >= 1, or null for logging_steps"),
    ("training_config.save_total_limit", lambda v: v is None or v >= 1, "use >= 1, or null to keep every checkpoint"),
    ("training_config.generation_max_length", lambda v: v >= 1, "use a value >= 1"),
    ("training_config.warmup_ratio", lambda v: 0 <= v <= 1, "use a value in [0, 1]"),
    ("training_config.warmup_steps", lambda v: v >= 0, "use a value >= 0"),
    ("training_config.max_grad_norm", lambda v: v >= 0, "use >= 0 (0 = no clipping)"),
    ("training_config.weight_decay", lambda v: v >= 0, "use a value >= 0"),
    ("training_config.adam_beta1", lambda v: 0 <= v < 1, "use a value in [0, 1)"),
    ("training_config.adam_beta2", lambda v: 0 <= v < 1, "use a value in [0, 1)"),
    ("training_config.remove_unused_columns", lambda v: v,
     "philora always keeps only the token columns; remove the key or set it to true"),
    ("training_config.gradient_checkpointing_kwargs", lambda v: set(v or {}) <= {"use_reentrant"},
     "only use_reentrant is supported"),
    ("peft_config.init_lora_weights", lambda v: v in (True, False, "gaussian", "pissa", "olora")
     or str(v).startswith("pissa_niter_"), "use true, false, gaussian, pissa, pissa_niter_N or olora"),
    ("training_config.report_to", lambda v: set([v] if isinstance(v, str) else v) <= set(REPORTERS),
     "use none, tensorboard, wandb, mlflow, or a list of them"),
    ("data.max_length", lambda v: v >= 16, "use at least 16 tokens"),
    ("data.max_eval_samples", lambda v: v is None or v >= 1, "use >= 1, or null for all"),
    ("data.num_proc", lambda v: v is None or v >= 1, "use >= 1, or null for all cores"),
    ("data.eval", lambda v: not isinstance(v, float) or 0 < v <= 0.5, "a held-out fraction must be in (0, 0.5]"),
]  # fmt: skip


def check_values(config: Config, place: Callable[[str], str]) -> list[str]:
    """Every value that cannot work, as '<file:line>: section.key: <value> is not allowed; <fix>'."""
    problems = []
    for key, ok, fix in RULES:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if not ok(value):
            problems.append(f"{place(key)}: {key}: {value!r} is not allowed; {fix}")
    t, d = config.training_config, config.data
    if t.bf16 and t.fp16:
        problems.append(f"{place('training_config.fp16')}: training_config.bf16/fp16: both true; choose one")
    if d.train is not None and d.eval is None:
        for key, on in (("predict_with_generate", t.predict_with_generate), ("do_eval", t.do_eval),
                        ("eval_strategy", t.eval_strategy != "no")):  # fmt: skip
            if on:
                problems.append(f"{place('training_config.' + key)}: training_config.{key}: needs eval data; "
                                "set data.eval to a file or a fraction of train")  # fmt: skip
    if d.train is None and isinstance(d.eval, float):
        problems.append(f"{place('data.eval')}: data.eval: a fraction needs data.train; the sample dataset has "
                        "its own eval split")  # fmt: skip
    return problems
