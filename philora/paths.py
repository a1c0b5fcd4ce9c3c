"""Where philora keeps what it makes once and reuses: the converted embedded model, encoded data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$PHILORA_CACHE_DIR, else $XDG_CACHE_HOME/philora (~/.cache/philora)."""
    if env := os.environ.get("PHILORA_CACHE_DIR"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "philora"
