"""Reading a config: the YAML file or a packaged preset, `--set` overrides, types and values checked, every
problem reported at once in one `UserError`."""

from __future__ import annotations

import dataclasses
import difflib
import typing
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


def load_config(
    path: str | None = None, overrides: list[str] | tuple[str, ...] = (), trust_remote_code: bool | None = None
) -> Config:
    """Read a YAML config (none = the demo preset), apply `--set` overrides, validate; all problems at once.
    Relative input paths in the file are made absolute from its folder (relative.py).
    `trust_remote_code`: whether a command that loads the model got --trust-remote-code (None: one that loads none,
    which takes model.trust_remote_code as written)."""
    source = resolve_config_path(path or "demo")
    raw, lines = _read_yaml(source)
    problems: list[str] = []
    overridden = {key for item in overrides if (key := _apply_override(raw, item, problems))}

    def place(key: str) -> str:
        if key in overridden:
            return "--set"
        return f"{source}:{lines[key]}" if key in lines else str(source)

    config = _build(raw, problems, place)
    problems += resolve_inputs(config, source, set(lines) - overridden, place)
    if trust_remote_code is not None:
        problems += _grant_remote_code(config, trust_remote_code, place)
    problems += check_values(config, place)
    if problems:
        raise UserError(*problems)
    return config


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
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        problems.append(f"--set {item}: section {parts[0]} is not a mapping in the config file")
        return None
    section[parts[1]] = value
    return ".".join(parts)


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


def dump_documented(config: Config) -> str:
    """The config as YAML with every field's meaning as a comment: the reference for all options."""
    out = []
    for name, cls in SECTIONS.items():
        out.append(f"{name}:")
        section = getattr(config, name)
        for f in dataclasses.fields(cls):
            value = yaml.safe_dump(getattr(section, f.name), default_flow_style=True, width=1000).strip()
            value = value.removesuffix("...").strip()
            out.append(f"  {f.name}: {value}".ljust(44) + f"  # {f.metadata['help']}")
    return "\n".join(out) + "\n"
