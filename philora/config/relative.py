"""Relative paths in a config file are read from beside that file, so that a config and its data travel together
and give the same run from any folder. What a run writes (training_config.output_dir, logging_dir) stays under the
working directory, as with every other training tool; so do `--set` values, typed where the command runs."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from pathlib import Path

from philora.config.fields import PACKAGED_CONFIGS, Config
from philora.errors import UserError
from philora.paths import SAMPLE_PREFIX, names_hub_dataset, names_hub_model


def _other_data(spec: str) -> bool:
    return spec.startswith(SAMPLE_PREFIX) or names_hub_dataset(spec)


# The keys that name something a run reads, each with what tells a value that names no path (a hub id, a sample).
INPUTS: dict[str, Callable[[str], bool]] = {
    "model.name_or_path": names_hub_model,
    "model.adapter": lambda value: False,
    "data.train": _other_data,
    "data.eval": _other_data,
}


def resolve_inputs(config: Config, source: Path, in_file: Collection[str], place: Callable[[str], str]) -> list[str]:
    """Make the relative input paths the file `source` gives (the keys `in_file`) absolute, from its folder, in
    `config`; a problem for each that is not there."""
    if source.resolve().is_relative_to(PACKAGED_CONFIGS.resolve()):
        return []  # a preset's only paths are what an earlier run wrote under the working directory (out/demo)
    folder = source.absolute().parent
    problems = []
    for key, names_other in INPUTS.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if key not in in_file or not isinstance(value, str) or not value or os.path.isabs(value) or value[0] == "~":
            continue
        beside = Path(os.path.abspath(folder / value))  # abspath: ../data reads as the user wrote it, links kept
        if beside.exists():
            setattr(getattr(config, section), name, str(beside))
        elif Path(value).exists() or not names_other(value):
            problems.append(_missing(place(key), key, value, folder, source.name))
    return problems


def _missing(where: str, key: str, value: str, folder: Path, config_name: str) -> str:
    # Found in the working directory only: where such a path was read from before, so the fix is worth saying.
    moved = f"; {value} is in the working directory: write the path relative to the config, or absolute"
    return (
        f"{where}: {key}: {value}: no such file or folder (looked in {folder}{os.sep}, beside {config_name}"
        f"{moved if Path(value).exists() else ''})"
    )


def missing_data(config: Config) -> list[str]:
    """data.train and data.eval naming a path with nothing there, one line each with the key, where the value came
    from, the path tried and where a relative path is read from. load_config reported those a config file gives as
    relative paths; this finds the rest (absolute ones, --set values) before anything slow loads."""
    problems = []
    for key in ("data.train", "data.eval"):
        value = getattr(config.data, key.split(".")[1])
        if isinstance(value, str) and value and not _other_data(value) and not Path(value).expanduser().exists():
            origin = config.origin(key)
            problems.append(missing_path(f"{origin}: {key}: {value}", value, _read_from(origin)))
    return problems


def missing_path(label: str, value: str, read_from: str) -> str:
    """'LABEL: no such file or folder (tried /abs/VALUE; READ_FROM)' for a data path `value` with nothing there;
    `read_from` says where a relative one is read from."""
    tried = Path(os.path.abspath(Path(value).expanduser()))
    where = "" if os.path.isabs(os.path.expanduser(value)) else f"; {read_from}"
    return f"{label}: no such file or folder (tried {tried}{where})"


def _read_from(origin: str) -> str:
    if origin.startswith("-"):  # --set or a flag: typed where the command runs
        return f"a path given with {origin} is read from the working directory, one in a config file from its folder"
    return "a relative path in a config file is read from the file's folder"


def require_data(what: str, spec: str) -> None:
    """UserError where a data value typed on the command line (`what`, e.g. FILE) names a path with nothing there."""
    if not _other_data(spec) and not Path(spec).expanduser().exists():
        raise UserError(missing_path(f"{what} {spec}", spec, "a relative path is read from the working directory"))
