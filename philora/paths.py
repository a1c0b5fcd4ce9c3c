"""Where philora keeps what it makes once and reuses (the converted embedded model, encoded data), the modes of the
files it writes, and how a value that names data or a model tells a local path from a hub id or a shipped sample."""

from __future__ import annotations

import os
import re
from pathlib import Path

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # the data files philora reads
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")  # owner/name, for a dataset also owner/name:split
SAMPLE_PREFIX = "sample:"  # sample:NAME is philora/sample/NAME.jsonl, shipped with philora


def names_hub_dataset(spec: str) -> bool:
    """Whether a data value that is not on disk reads as a hub dataset id (owner/name[:split]), not a path: a name
    with a data file's suffix is a file that is missing."""
    return bool(HUB_ID.match(spec)) and Path(spec).suffix not in DATA_SUFFIXES


def names_hub_model(name: str) -> bool:
    """Whether a model value that is not on disk reads as a hub id (name or owner/name), not a path: one that starts
    like a path or has more than one slash is a directory that is missing."""
    return not (name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name)


def cache_root() -> Path:
    """$PHILORA_CACHE_DIR, else $XDG_CACHE_HOME/philora (~/.cache/philora)."""
    if env := os.environ.get("PHILORA_CACHE_DIR"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "philora"


def umask_modes(folder: Path) -> None:
    """Give the safetensors files in `folder` (and below) the mode a plain open() gives a new file: 0o666 less the
    umask, as every other file of an adapter or a model has.

    safetensors (0.8) writes each file as a temporary one, which is created 0600, and renames it into place: an
    adapter or merged model would be readable by its owner alone, and a server running as another user (vLLM,
    llama.cpp, a teammate) could not load it."""
    mode = 0o666 & ~current_umask()
    for path in folder.rglob("*.safetensors"):
        path.chmod(mode)


def current_umask() -> int:
    """The process's umask. Reading it means setting it: set to 0o077 for that instant, so a file another thread
    creates meanwhile is only ever more private, never less."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
