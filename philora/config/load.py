"""Reading a config: the YAML file or a packaged preset, `--set` overrides, types and values checked, every
problem reported at once in one `UserError`."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from philora.config.checks import check_type, check_values, coerce
from philora.config.fields import NOT_HONOURED, PACKAGED_CONFIGS, SECTIONS, Config
from philora.config.relative import resolve_inputs
from philora.errors import UserError


def resolve_config_path(name: str) -> Path:
    """A path, or the name of a packaged preset (`demo`, `phi3-mini-4k-lora`, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / f"{name.removesuffix('.yaml')}.yaml"
    if len(path.parts) == 1 and packaged.is_file():
        return packaged
    presets = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
    raise UserError(f"--config {name}: no such file; give a YAML path or a preset name ({presets})")


# A command-line flag that sets a config value: (the flag as typed, "section.key", its value), e.g.
# ("--output", "training_config.output_dir", "runs/a"). Its value is taken as given, not read as YAML.
Flag = tuple[str, str, Any]
AUTO_MAX_LENGTH = "auto (p99 of the training data, known once it is read)"


def load_config(
    path: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    trust_remote_code: bool | None = None,
    flags: Sequence[Flag] = (),
) -> Config:
    """Read a YAML config (none = the demo preset), apply `--set` overrides and then `flags`, validate; all problems
    at once. Relative input paths in the file are made absolute from its folder (relative.py). Where every value
    came from is in `config.origins`; values left to `auto` are resolved (`resolve_auto`), max_length once the data
    is read (data.prepare).
    `trust_remote_code`: whether a command that loads the model got --trust-remote-code (None: one that loads none,
    which takes model.trust_remote_code as written)."""
    source = resolve_config_path(path or "demo")
    raw, lines = _read_yaml(source)
    problems: list[str] = []
    given = {key: "--set" for item in overrides if (key := _apply_override(raw, item, problems))}
    for flag, key, value in flags:
        section, name = key.split(".")
        if isinstance(_section(raw, section), dict):  # else _build reports the section that is no mapping
            raw[section][name] = value
            given[key] = flag

    def place(key: str) -> str:
        if key in given:
            return given[key]
        return f"{source}:{lines[key]}" if key in lines else str(source)

    config = _build(raw, problems, place)
    shown = source.name if _packaged(source) else str(source)
    config.origins = {key: given.get(key) or f"{shown}:{lines[key]}" for key in _keys() if key in given or key in lines}
    problems += resolve_inputs(config, source, set(lines) - set(given), place)
    if trust_remote_code is not None:
        problems += _grant_remote_code(config, trust_remote_code, place)
    problems += check_values(config, place)
    if problems:
        raise UserError(*problems)
    resolve_auto(config)
    return config


def resolve_auto(config: Config) -> None:
    """The values left null = auto that follow from other values: evaluation (answers before and after, and the eval
    loss, once) happens when the run has eval data. Downstream code sees booleans. max_length follows the data, so it is
    only marked here; data.prepare sets it."""
    d, t = config.data, config.training_config
    if d.eval is not None:
        has_eval, why = True, "data.eval is set"
    elif d.train is None:
        has_eval, why = True, "the sample data has an eval split"
    else:
        has_eval, why = False, "no data.eval"
    if t.predict_with_generate is None:
        t.predict_with_generate = has_eval
        config.origins["training_config.predict_with_generate"] = f"auto ({why})"
    if t.do_eval is None:
        # sft's answers after training come with the eval loss of both models: a loss pass of its own would repeat it
        answered = t.method == "sft" and t.predict_with_generate
        t.do_eval = has_eval and not answered
        config.origins["training_config.do_eval"] = f"auto ({'predict_with_generate reports it' if answered else why})"
    if d.max_length is None:
        config.origins["data.max_length"] = AUTO_MAX_LENGTH


def _keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _packaged(source: Path) -> bool:
    return source.resolve().is_relative_to(PACKAGED_CONFIGS.resolve())


def _grant_remote_code(config: Config, flag: bool, place: Any) -> list[str]:
    """--trust-remote-code is the one grant to run a model's own code, and it sets model.trust_remote_code (what
    run.json records). A config saying true without it is refused: a file passed around would otherwise run code
    nobody asked for on the command line. --set is refused too, so that there is one way to say it."""
    if flag:
        config.model.trust_remote_code = True
        return []
    if config.model.trust_remote_code is not True:
        return []
    where = place("model.trust_remote_code")
    given = "--set model.trust_remote_code=true" if where == "--set" else f"model.trust_remote_code: true in {where}"
    return [f"{given} runs the model's own code; pass --trust-remote-code to allow it"]


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the config ({e})") from None
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()  # kept for the line numbers of keys
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the config must be a mapping with sections {', '.join(SECTIONS)}")
    return data, _key_lines(node)


def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """Line number of every `section.key` in the YAML, for error messages."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}{key.value}"
            lines[path] = key.start_mark.line + 1
            lines.update(_key_lines(value, path + "."))
    return lines


def _apply_override(raw: dict[str, Any], item: str, problems: list[str]) -> str | None:
    """Set one `SECTION.KEY=VALUE`; the key it set, or None after adding a problem."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        problems.append(f"--set {item}: expected SECTION.KEY=VALUE, e.g. training_config.max_steps=20")
        return None
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML: take it as the literal string
    section = _section(raw, parts[0])
    if not isinstance(section, dict):
        problems.append(f"--set {item}: section {parts[0]} is not a mapping in the config file")
        return None
    section[parts[1]] = value
    return ".".join(parts)


def _section(raw: dict[str, Any], name: str) -> Any:
    """The section `name` of the file, made an empty mapping where the file has none or leaves it empty."""
    if raw.get(name) is None:
        raw[name] = {}
    return raw[name]


def _is_lora_option(key: str) -> bool:
    from peft import LoraConfig

    return key in {f.name for f in dataclasses.fields(LoraConfig)}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.7)
    return f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(options)}"


def _build(raw: dict[str, Any], problems: list[str], place: Any) -> Config:
    sections = {}
    for name in raw:
        if name not in SECTIONS:
            problems.append(f"{place(name)}: {name}: unknown section{_suggest(str(name), list(SECTIONS))}")
    for name, cls in SECTIONS.items():
        given = raw.get(name) or {}
        if not isinstance(given, dict):
            problems.append(f"{place(name)}: {name}: expected a mapping of keys, got {given!r}")
            given = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in given.items():
            where = f"{place(f'{name}.{key}')}: {name}.{key}"
            if key not in fields:
                if key in NOT_HONOURED.get(name, ()) or (name == "peft_config" and _is_lora_option(key)):
                    problems.append(f"{where}: philora does not honour this option yet; remove it")
                else:
                    problems.append(f"{where}: unknown key{_suggest(str(key), list(fields))}")
                continue
            value = coerce(value, hints[key])
            if (error := check_type(value, hints[key])) is not None:
                problems.append(f"{where}: {error}")
                continue
            values[key] = value
        sections[name] = cls(**values)
    return Config(**sections)


def dump_documented(config: Config, demo: bool = False) -> str:
    """The config as YAML, each field with where its value came from and what it means in a comment (as
    `git config --show-origin` does): the reference for all options. `demo`: the config is the demo preset that
    commands without --config run, which is not what a file of your own starts from; the header says so."""
    out = []
    if demo:
        preset = f"{PACKAGED_CONFIGS.parent.name}/{PACKAGED_CONFIGS.name}/demo.yaml"
        out.append(f"# The embedded demo preset ({preset}): what `philora train` and `philora check` run without "
                   "--config.")  # fmt: skip
        out.append("# A config file of your own starts from the defaults instead: the values marked [default] below.")
    out.append("# [where each value came from: default, FILE:LINE, --set, a flag, or auto (...)] what it means")
    for name, cls in SECTIONS.items():
        out.append(f"{name}:")
        section = getattr(config, name)
        for f in dataclasses.fields(cls):
            value = yaml.safe_dump(getattr(section, f.name), default_flow_style=True, width=1000).strip()
            value = value.removesuffix("...").strip()
            origin = config.origin(f"{name}.{f.name}")
            out.append(f"  {f.name}: {value}".ljust(44) + f"  # [{origin}] {f.metadata['help']}")
    return "\n".join(out) + "\n"
