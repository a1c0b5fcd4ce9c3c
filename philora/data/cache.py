"""Encoded data on disk, keyed by everything that decides it, so the same data is tokenized once.

The key hashes the source's bytes (or a datasets fingerprint), the format and column mapping, the tokenizer
(vocabulary, merges, special tokens and chat template), train_on, max_length, the overlong policy and the row size
limit, and philora's encoding version. An entry is one `.npz` file of flat arrays (no pickle), written to a temporary
name and renamed, so a run stopped mid-write leaves no half entry. Entries live under
`$PHILORA_CACHE_DIR/data` (default ~/.cache/philora/data); deleting them is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from philora.data.encode import FITS, Outcome
from philora.data.render import IGNORE, Sample
from philora.paths import cache_root

VERSION = 2  # bump when the encoding of the same inputs changes


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:32]


def _path(entry: str) -> Path:
    return cache_root() / "data" / f"{entry}.npz"


def load(entry: str) -> list[Outcome] | None:
    path = _path(entry)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except (OSError, ValueError, KeyError):
        return None  # a damaged entry is re-made
    problems = json.loads(str(arrays["problems"]))
    ids = arrays["ids"]
    labels = np.where(arrays["mask"], ids, IGNORE).astype(np.int32)
    bounds = np.concatenate([[0], np.cumsum(arrays["lengths"])]).tolist()
    outcomes, s = [], 0
    for row, (fit, count) in enumerate(zip(arrays["fits"].tolist(), arrays["counts"].tolist(), strict=True)):
        edges = bounds[s : s + count + 1]
        samples = [Sample(ids[a:b], labels[a:b]) for a, b in pairwise(edges)]
        s += count
        outcomes.append(Outcome(samples, FITS[fit], problems.get(str(row))))
    return outcomes


def save(entry: str, outcomes: list[Outcome]) -> None:
    samples = [s for o in outcomes for s in o.samples]
    arrays = {
        "fits": np.array([FITS.index(o.fit) for o in outcomes], dtype=np.int8),
        "counts": np.array([len(o.samples) for o in outcomes], dtype=np.int32),
        "lengths": np.array([len(s.input_ids) for s in samples], dtype=np.int32),
        "ids": np.concatenate([s.input_ids for s in samples]) if samples else np.zeros(0, np.int32),
        "mask": np.concatenate([s.labels != IGNORE for s in samples]) if samples else np.zeros(0, bool),
        "problems": np.array(json.dumps({str(i): o.problem for i, o in enumerate(outcomes) if o.problem})),
    }
    path = _path(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
