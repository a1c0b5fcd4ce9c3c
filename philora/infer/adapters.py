"""Load a trained adapter (or none) on its base model for eval, merge, chat and serve.

An adapter directory written by `philora train` sits in a run directory whose `run.json` records the model
section it was trained with; that is the base it belongs to. Adapters from elsewhere name their base in
`adapter_config.json` (`base_model_name_or_path`). `--model` overrides both. The base is never quantised for
these commands, even for a QLoRA adapter: quantisation is a training-time memory trick, and answers or merges
from a de-quantised 4-bit copy would differ from the original weights.

The weights load in the dtype the run trained in (run.json records it, resolved: `auto` became bf16 or fp32 on
the machine that trained), so an eval or a chat on any machine computes what the run computed; `--dtype`
overrides it, and adapters from elsewhere get `auto`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from philora.config import ModelSection
from philora.errors import UserError
from philora.rundir import RunDir


@dataclass
class Adapter:
    name: str
    path: Path
    model: ModelSection  # the base it was trained on
    dtype: str | None = None  # the weights dtype its run trained in; None for adapters from elsewhere
    autocast: str = "no"  # the run's mixed precision: bf16 / fp16 autocast over those weights, or no


def read_adapter(path: str | Path, name: str = "default") -> Adapter:
    """The adapter at `path` (an adapter dir, or a run dir holding `adapter/`) and the base model it needs."""
    path = Path(path).expanduser()
    if (path / "adapter" / "adapter_config.json").is_file():
        path = path / "adapter"
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        what = "no such directory" if not path.exists() else "no adapter_config.json there"
        raise UserError(f"--adapter {path}: {what}; give the adapter/ dir of a run (or the run dir itself)")
    run_file = RunDir(path.parent).record
    if run_file.is_file():
        run = json.loads(run_file.read_text())
        model = known_fields(ModelSection, run["config"]["model"])
        return Adapter(name, path, model, run.get("model_dtype"), run.get("mixed_precision", "no"))
    from philora.model.embedded import is_embedded

    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"--adapter {path}: adapter_config.json names no base model; pass --model")
    # An adapter of the embedded model names its converted cache dir, which on this machine may be elsewhere.
    return Adapter(name, path, ModelSection(name_or_path=None if is_embedded(base) else base))


def read_run_config(adapter: Adapter) -> dict[str, Any] | None:
    """The config the adapter was trained with, when it sits in a philora run dir."""
    run_file = RunDir(adapter.path.parent).record
    return json.loads(run_file.read_text())["config"] if run_file.is_file() else None


def known_fields(cls: Any, values: dict[str, Any]) -> Any:
    """`cls(**values)` without the keys `cls` does not have (a record written by another philora version)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


def weights_dtype(adapters: list[Adapter], requested: str | None) -> str:
    """--dtype when given, else the dtype the adapters' runs trained in (auto when unknown); says which."""
    if requested is not None:
        return requested
    recorded = {a.dtype for a in adapters if a.dtype is not None}
    if len(recorded) != 1:
        return "auto"
    (dtype,) = recorded
    print(f"philora: loading the weights in {dtype}, as the run trained (--dtype to change)", file=sys.stderr)
    return dtype


def autocast(adapter: Adapter | None) -> AbstractContextManager[Any]:
    """The run's mixed-precision autocast (bf16/fp16 compute over its weights), for numbers equal to the run's."""
    import torch

    from philora import hardware

    if adapter is None or adapter.autocast not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if adapter.autocast == "bf16" else torch.float16
    return torch.autocast(hardware.device().type, dtype=dtype)


def base_section(adapters: list[Adapter], model: str | None, dtype: str | None = None) -> ModelSection:
    """The unquantised base to load: --model if given, else the one every adapter was trained on; in --dtype,
    else in the dtype the runs trained in."""
    dtype = weights_dtype(adapters, dtype)
    if model is not None:
        return ModelSection(name_or_path=model, dtype=dtype)
    bases = {a.model.name_or_path for a in adapters}
    if len(bases) > 1:
        names = ", ".join(f"{a.name}: {a.model.name_or_path or 'the embedded model'}" for a in adapters)
        raise UserError(f"--adapter: these adapters were trained on different base models ({names}); pass --model")
    first = adapters[0].model if adapters else ModelSection()
    if first.quantization:
        print(
            f"philora: the adapter was trained on a {first.quantization} base; loading the original weights "
            "unquantised",
            file=sys.stderr,
        )
    return dataclasses.replace(first, quantization=None, dtype=dtype)


def load(adapters: list[Adapter], model: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) ready for generation: the base with every adapter loaded by name, the first active.
    With no adapters the plain base model is returned."""
    from philora.model.load import load_model, load_tokenizer, without_bitsandbytes

    section = base_section(adapters, model, dtype)
    tokenizer = load_tokenizer(section)
    with without_bitsandbytes():  # the base is never quantised here
        base = load_model(section, training=False)
        if not adapters:
            base.eval()
            return base, tokenizer
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(base, str(adapters[0].path), adapter_name=adapters[0].name)
        for a in adapters[1:]:
            peft_model.load_adapter(str(a.path), adapter_name=a.name)
    peft_model.set_adapter(adapters[0].name)
    peft_model.eval()
    return peft_model, tokenizer
