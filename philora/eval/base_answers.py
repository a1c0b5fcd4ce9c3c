"""The base model's answers to a run's eval prompts: saved by `philora train` before training changes the model
(RUN/base-answers.json), with a record of what they were computed from, so that `philora eval` reuses them when it
would compute the same answers, and says why it answers again when it would not.

Greedy answers are a function of the weights and their dtype, the arithmetic (the run's autocast), the device, the
prompts' tokens (data, chat template, tools and tokenizer at once) and the decoding: max_new_tokens, and the batch
size, since prompts are answered in left-padded batches whose rounding differs with their composition. The record
holds exactly those; any difference means the answers are computed again. A file from before the record (a bare
list of answers) is still read by a resumed run of its own, never reused by `philora eval`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from philora.config import ModelSection
from philora.data.render import ChatEncoder

Question = tuple[list[dict[str, Any]], list[dict[str, Any]] | None]  # messages, tools offered


@dataclass(frozen=True)
class Answered:
    """What a set of base answers was computed from; equal records, equal answers."""

    model: str | None  # the base: a local dir (resolved), a hub id, or None for the embedded model
    revision: str | None
    quantization: str | None  # QLoRA's 4/8-bit base answers otherwise than the full-precision one eval loads
    start_adapter: str | None  # model.adapter: a run's "base" answers are then that adapter's, not the bare base's
    dtype: str  # the weights'
    autocast: str  # the run's mixed precision over them: no, bf16, fp16
    device: str  # cpu, cuda, mps: kernels differ in their last bits, and a near-tie flips a greedy answer
    prompts: str  # sha256 of the prompts' token ids
    count: int
    max_new_tokens: int
    batch_size: int
    decoding: str = "greedy"


def answered(
    model_section: ModelSection,
    model: Any,
    autocast: str,
    encoder: ChatEncoder,
    questions: Sequence[Question],
    max_new_tokens: int,
    batch_size: int,
) -> Answered:
    """The record for answers to `questions` from `model` (the base, or a peft model whose adapter is disabled for
    them) as `model_section` names it."""
    weights = next(model.parameters())
    ids = [encoder.ids(messages, True, tools) for messages, tools in questions]
    return Answered(
        model=same_name(model_section.name_or_path),
        revision=model_section.revision,
        quantization=model_section.quantization,
        start_adapter=same_name(model_section.adapter),
        dtype=str(weights.dtype).removeprefix("torch."),
        autocast=autocast,
        device=weights.device.type,
        prompts=hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        count=len(ids),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )


def same_name(name: str | None) -> str | None:
    """A model or adapter as compared: a local dir by its resolved path (./base and /abs/base are one), else as is."""
    if name is None:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def save(path: Path, answers: list[str], record: Answered) -> None:
    content = {"answers": answers, "computed_with": dataclasses.asdict(record)}
    path.write_text(json.dumps(content, ensure_ascii=False, indent=1) + "\n")


def read(path: Path) -> list[str] | None:
    """The saved answers, in either form (a bare list from an older philora), or None when there is no file."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if isinstance(saved, list) else saved["answers"]


def reusable(path: Path, wanted: Answered) -> tuple[list[str] | None, str]:
    """(the saved answers, why they fit) when they were computed as `wanted` would compute them; else (None, why
    they are computed again)."""
    if not path.is_file():
        return None, f"the run saved none ({path.name})"
    saved = json.loads(path.read_text())
    record = saved.get("computed_with") if isinstance(saved, dict) else None
    if not isinstance(record, dict):
        return None, f"{path} does not record what they were computed with (an older philora)"
    fields = [f.name for f in dataclasses.fields(Answered) if record.get(f.name) != getattr(wanted, f.name)]
    if "count" in fields:  # other prompts, obviously: say how many
        fields.remove("prompts")
    differs = [difference(name, record.get(name), getattr(wanted, name)) for name in fields]
    if differs:
        return None, f"the run's saved ones ({path}) differ: {'; '.join(differs)}"
    return saved["answers"], f"same model, prompts and decoding as {path}"


def difference(field: str, saved: Any, now: Any) -> str:
    if field == "prompts":
        return "other prompts (other data, --limit, or another chat template)"
    names = {"model": "base", "start_adapter": "model.adapter", "count": "prompts"}
    return f"{names.get(field, field)} {now} here, {saved} in the run"
