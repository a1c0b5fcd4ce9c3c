"""Nested state (an optimizer's or scheduler's state_dict, RNG states) as JSON text and a safetensors file, so that
reading it back runs no unpickler: a checkpoint from someone else can hold numbers and tensors, never code.

The JSON keeps the structure and every plain value; each tensor is replaced by {"tensor": NAME}, its data stored in
the safetensors file under NAME. Tuples and dicts whose keys are not strings (an optimizer's per-parameter state is
keyed by index) are tagged so they come back as they were.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

PLAIN = (str, int, float, bool, type(None))


def save(state: Any, json_path: Path, tensors_path: Path) -> None:
    """Write `state` as JSON at `json_path` and its tensors at `tensors_path`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    json_path.write_text(json.dumps(_encode(state, tensors), indent=1) + "\n")
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(tensors_path))


def load(json_path: Path, tensors_path: Path) -> Any:
    """The state `save` wrote; ValueError where the two files do not fit together."""
    from safetensors.torch import load_file

    return _decode(json.loads(json_path.read_text()), load_file(str(tensors_path), device="cpu"))


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value
        return {"tensor": name}
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        return {"items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"a {type(value).__name__} cannot be kept as plain data in a checkpoint")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if value.keys() == {"tensor"}:
        if value["tensor"] not in tensors:
            raise ValueError(f"tensor {value['tensor']} is missing")
        return tensors[value["tensor"]]
    if value.keys() == {"tuple"}:
        return tuple(_decode(v, tensors) for v in value["tuple"])
    if value.keys() == {"items"}:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["items"]}
    raise ValueError(f"an object with keys {sorted(value)[:5]} is not one this format writes")
