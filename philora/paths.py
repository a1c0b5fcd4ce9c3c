"""Where philora keeps what it makes once and reuses (the converted embedded model, encoded data), and the modes of
the files it writes."""

from __future__ import annotations

import os
from pathlib import Path


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
