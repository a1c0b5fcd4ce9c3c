"""Writing a folder so that a kill or a power cut leaves the old one or the new one whole, never a part: its files
and folders flushed to the disk, then renamed into place. Checkpoints and the run's adapter are written this way."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TEMPORARY = ".tmp-"  # what is being written, or an older copy set aside while a new one replaces it


def fsync(path: Path) -> None:
    """Flush a file's data, or a dir's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_tree(folder: Path) -> None:
    """Flush every file and folder under `folder`, and `folder` itself: a rename after this cannot outlive them."""
    for path in [*folder.rglob("*"), folder]:
        fsync(path)


def put_in_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. A dir cannot replace a non-empty one in one rename, so an older `final` (a checkpoint
    step written again after a resume, the adapter of a run finished again) is renamed aside first and removed
    after: a kill in between leaves only a `.tmp-` dir, which the next save or run removes."""
    aside = final.parent / f"{TEMPORARY}old-{final.name}"
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
