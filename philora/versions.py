"""The versions of philora and the libraries whose behaviour a run's numbers depend on, as records store them."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from philora import __version__

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"philora": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions
