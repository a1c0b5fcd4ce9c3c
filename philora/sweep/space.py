"""The search space: each `--set-range KEY=SPEC` read into a `Range`, its key and its values checked against the
config the trials train from, before any trial starts.

A SPEC is `LOW:HIGH` (uniform), `LOW:HIGH:log` (log-uniform) or `[a,b,c]` (one of these, each read as a YAML scalar,
as `--set` reads a value). Whether a range draws whole numbers follows the key's type in the config (peft_config.r,
training_config.max_steps), not how its ends are written: `warmup_ratio=0:1` is a fraction, never 0 or 1.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from philora.config import Config, load_config
from philora.config.fields import SECTIONS
from philora.errors import UserError

EXAMPLES = "training_config.learning_rate=1e-5:1e-3:log, training_config.max_steps=20:80 or peft_config.r=[8,16,32]"
# What the sweep sets on every trial itself: a range over them would fight it.
SET_BY_SWEEP = ("training_config.output_dir", "training_config.overwrite_output_dir")


@dataclass(frozen=True)
class Range:
    """One swept key: a numeric interval (`low`..`high`, log-scaled or not, whole numbers or not) or `choices`."""

    key: str  # section.key
    spec: str  # as typed, for messages
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    @property
    def flag(self) -> str:
        return f"--set-range {self.key}={self.spec}"

    @property
    def name(self) -> str:  # the key without its section, for table headers
        return self.key.split(".", 1)[1]

    def canonical(self) -> str:
        """The range written one way (sweep.json compares these): `1e-05:0.001:log`, `20:80`, `[8, 16, 32]`."""
        if self.choices is not None:
            return "[" + ", ".join(value_text(c) for c in self.choices) + "]"
        return f"{self.low!r}:{self.high!r}" + (":log" if self.log else "")

    def distribution(self) -> Any:
        """The range as an Optuna distribution (optuna imported here: the rest of the module needs none)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices is not None:
            return CategoricalDistribution(list(self.choices))
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log)  # type: ignore[arg-type]
        return FloatDistribution(float(self.low), float(self.high), log=self.log)  # type: ignore[arg-type]


def value_text(value: Any) -> str:
    """A value as `--set` reads it back to the same value: YAML (`1.0e-05`, not `1e-05`, which YAML 1.1 reads as a
    string; `null`, `true`)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def parse_range(item: str) -> Range:
    """`KEY=SPEC` as a Range; a UserError naming the flag, the value and the fix."""
    key, sep, spec = (part.strip() for part in item.partition("="))
    where = f"--set-range {item}"
    if not sep or not spec or len(key.split(".")) != 2:
        raise UserError(f"{where}: expected KEY=SPEC, e.g. {EXAMPLES}")
    section, name = key.split(".")
    if section not in SECTIONS or name not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        raise UserError(f"{where}: no such key{_suggest(key)}")
    if key in SET_BY_SWEEP:
        raise UserError(f"{where}: the sweep sets {key} for each trial itself; sweep another key")
    if spec.startswith("["):
        return Range(key, spec, choices=_choices(where, spec))
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise UserError(f"{where}: expected LOW:HIGH, LOW:HIGH:log or [a,b,c], e.g. {EXAMPLES}")
    kind = _numeric_kind(section, name)
    if kind is None:
        raise UserError(f"{where}: {key} is not a number; give its choices instead, e.g. {key}=[a,b]")
    low, high = (_number(where, key, text, kind) for text in parts[:2])
    log = len(parts) == 3
    if not low < high:
        raise UserError(f"{where}: LOW must be below HIGH, e.g. {key}={high}:{low}" + (":log" if log else ""))
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs LOW > 0; drop :log, or start above 0")
    return Range(key, spec, low=low, high=high, log=log, integer=kind is int)


def parse_ranges(items: list[str]) -> list[Range]:
    """Every --set-range, all problems at once; a key given twice is one of them."""
    ranges: list[Range] = []
    problems: list[str] = []
    for item in items:
        try:
            found = parse_range(item)
        except UserError as e:
            problems += e.problems
            continue
        if any(r.key == found.key for r in ranges):
            problems.append(f"{found.flag}: {found.key} is swept twice; give one --set-range per key")
            continue
        ranges.append(found)
    if problems:
        raise UserError(*problems)
    return ranges


def check_space(ranges: list[Range], config: str | None, overrides: list[str]) -> Config:
    """The trials' base config (the file or the demo, with the user's --set), loaded as `philora train` would, and
    each range's ends or choices loaded into it: a value the config refuses is a problem named by its --set-range.
    Returns the base config."""
    base = load_config(config, overrides)
    problems = []
    for r in ranges:
        for given in overrides:
            if given.partition("=")[0].strip() == r.key:
                problems.append(f"{r.flag}: --set {given} sets the same key; drop one of them")
        values = r.choices if r.choices is not None else (r.low, r.high)
        for value in values:
            try:
                load_config(config, [*overrides, f"{r.key}={value_text(value)}"])
            except UserError as e:
                problems += [f"{r.flag}: {_without_place(p, r.key)}" for p in e.problems]
                break  # one value refused says enough about the range
    if problems:
        raise UserError(*problems)
    return base


def _without_place(problem: str, key: str) -> str:
    """load_config's `--set: KEY: what` without the place and key the --set-range flag names already."""
    return problem.removeprefix("--set: ").removeprefix(f"{key}: ")


def _choices(where: str, spec: str) -> tuple[Any, ...]:
    try:
        values = yaml.safe_load(spec)
    except yaml.YAMLError:
        values = None
    if not isinstance(values, list) or not values:
        raise UserError(f"{where}: expected a list of values like [8,16,32]")
    if any(isinstance(v, (list, dict)) for v in values):
        raise UserError(f"{where}: each choice must be one value (a number, a word, true/false or null)")
    if len({value_text(v) for v in values}) != len(values):
        raise UserError(f"{where}: a choice is listed twice; list each once")
    return tuple(values)


def _numeric_kind(section: str, name: str) -> type | None:
    """int or float: what the key holds (a key that may also be null or a word counts by its number); None when
    it holds no number."""
    hint = typing.get_type_hints(SECTIONS[section])[name]
    kinds = typing.get_args(hint) or (hint,)
    if float in kinds:
        return float
    return int if int in kinds else None


def _number(where: str, key: str, text: str, kind: type) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a number; e.g. {EXAMPLES}") from None
    if not math.isfinite(value):
        raise UserError(f"{where}: {text!r} is not a finite number")
    if kind is float:
        return value
    if value != int(value):
        raise UserError(f"{where}: {key} takes whole numbers; give whole ends, e.g. {key}=8:64")
    return int(value)


def _suggest(key: str) -> str:
    """A close key: the name within its section (the section's own name when that is what is off)."""
    section, name = key.split(".")
    if section in SECTIONS:
        names = [f.name for f in dataclasses.fields(SECTIONS[section])]
        close = [f"{section}.{n}" for n in difflib.get_close_matches(name, names, n=1, cutoff=0.7)]
    else:
        close = [f"{s}.{name}" for s in difflib.get_close_matches(section, list(SECTIONS), n=1, cutoff=0.7)]
    return f"; did you mean {close[0]}?" if close else "; `philora config` lists every key"
