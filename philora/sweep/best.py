"""best.yaml: the config of the sweep's best trial, ready for `philora train --config DIR/best.yaml`, written as
`philora config` shows a config (every field, where its value came from, what it means)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from philora.config import dump_documented, load_config
from philora.config.relative import INPUTS

ORIGIN = "philora sweep"


def best_config(config: str | None, overrides: Sequence[str], sweep_sets: dict[str, str], trial_sets: dict[str, str],
                output_dir: Path, header: list[str]) -> str:  # fmt: skip
    """The base config (the file or the demo) with the user's --set, the sweep's own settings (`sweep_sets`: the
    evaluation it added) and the best trial's values (`trial_sets`), its output dir `output_dir`; each as
    KEY -> VALUE text. The values load_config resolves from others (auto) are written as null = auto again, and
    relative input paths absolute, as best.yaml sits elsewhere than the config it came from."""
    sets = {**sweep_sets, **trial_sets, "training_config.output_dir": str(output_dir)}
    loaded = load_config(config, [*overrides, *(f"{key}={value}" for key, value in sets.items())])
    for key, origin in list(loaded.origins.items()):
        section, name = key.split(".")
        if origin.startswith("auto"):
            setattr(getattr(loaded, section), name, None)
    for key in INPUTS:
        section, name = key.split(".")
        value = getattr(getattr(loaded, section), name)
        if isinstance(value, str) and value and not os.path.isabs(value) and Path(value).exists():
            setattr(getattr(loaded, section), name, os.path.abspath(value))
    for key in sweep_sets:
        loaded.origins[key] = f"{ORIGIN}: evaluation for pruning"
    for key in trial_sets:
        loaded.origins[key] = f"{ORIGIN}: the best trial"
    loaded.origins["training_config.output_dir"] = ORIGIN
    return "".join(f"# {line}\n" for line in header) + dump_documented(loaded)
