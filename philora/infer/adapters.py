"""Load a trained adapter (or none) on its base model for eval, merge, chat and serve.

An adapter directory written by `philora train` sits in a run directory whose `run.json` records the model
section it was trained with; that is the base it belongs to. Adapters from elsewhere name their base in
`adapter_config.json` (`base_model_name_or_path`). `--base` overrides both. The base is never quantised for
these commands, even for a QLoRA adapter: quantisation is a training-time memory trick, and answers or merges
from a de-quantised 4-bit copy would differ from the original weights.

The weights load in the dtype the run trained in (run.json records it, resolved: `auto` became bf16 or fp32 on
the machine that trained), so an eval or a chat on any machine computes what the run computed; `--dtype`
overrides it, and adapters from elsewhere get `auto`.

A model's own Python code (its config's auto_map) runs only with `--trust-remote-code` on the command that loads
it. run.json records whether the run trusted its base's code, but a run dir is a file that travels: its record
never grants that trust, it only explains a refusal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import typing
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from philora import progress
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
    trusted_code: bool = False  # its run trusted the base's own code (run.json); said in a refusal, never granted


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
        model = recorded_model(run["config"]["model"], run_file)
        trusted = run["config"]["model"].get("trust_remote_code") is True
        return Adapter(name, path, model, run.get("model_dtype"), run.get("mixed_precision", "no"), trusted)
    from philora.model.embedded import is_embedded

    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"--adapter {path}: adapter_config.json names no base model; pass --base")
    # An adapter of the embedded model names its converted cache dir, which on this machine may be elsewhere.
    return Adapter(name, path, ModelSection(name_or_path=None if is_embedded(base) else base))


def recorded_model(values: dict[str, Any], run_file: Path) -> ModelSection:
    """The model section a run.json records, checked as a config's would be (an attn_implementation naming a hub
    kernel would download and run it), without its trust_remote_code: only --trust-remote-code grants that."""
    from philora.config.checks import check_type

    model = known_fields(ModelSection, values)
    hints = typing.get_type_hints(ModelSection)
    problems = [
        f"{run_file}: model.{f.name}: {problem}"
        for f in dataclasses.fields(model)
        if (problem := check_type(getattr(model, f.name), hints[f.name]))
    ]
    if problems:
        raise UserError(*problems)
    return dataclasses.replace(model, trust_remote_code=False)


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
    progress.say(f"loading the weights in {dtype}, as the run trained (--dtype to change)")
    return dtype


def autocast(adapter: Adapter | None) -> AbstractContextManager[Any]:
    """The run's mixed-precision autocast (bf16/fp16 compute over its weights), for numbers equal to the run's."""
    import torch

    from philora import hardware

    if adapter is None or adapter.autocast not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if adapter.autocast == "bf16" else torch.float16
    return torch.autocast(hardware.device().type, dtype=dtype)


def base_section(
    adapters: list[Adapter], model: str | None, dtype: str | None = None, trust_remote_code: bool = False
) -> ModelSection:
    """The unquantised base to load: --base if given, else the one every adapter was trained on; in --dtype,
    else in the dtype the runs trained in; running its own code only with --trust-remote-code."""
    dtype = weights_dtype(adapters, dtype)
    if model is not None:
        return ModelSection(name_or_path=model, dtype=dtype, trust_remote_code=trust_remote_code)
    bases = {a.model.name_or_path for a in adapters}
    if len(bases) > 1:
        names = ", ".join(f"{a.name}: {a.model.name_or_path or 'the embedded model'}" for a in adapters)
        raise UserError(f"--adapter: these adapters were trained on different base models ({names}); pass --base")
    first = adapters[0].model if adapters else ModelSection()
    if first.quantization:
        progress.say(
            f"the adapter was trained on a {first.quantization} base; loading the original weights unquantised"
        )
    return dataclasses.replace(first, quantization=None, dtype=dtype, trust_remote_code=trust_remote_code)


def base_named(adapters: list[Adapter], model: str | None, flag: str = "--base") -> AbstractContextManager[None]:
    """Loads inside name a base that cannot be loaded (missing, not a model, needing its own code) by where it came
    from: `flag` as the user typed it (--base, or the old --model), or the adapter whose run named it; a refusal of
    its code says when that run trusted the code (so the user knows why a copied run dir stops at this)."""
    from philora.model.load import named_by

    if model is not None or not adapters:
        return named_by(flag)
    trusted = next((a for a in adapters if a.trusted_code), None)
    if trusted is None:
        return named_by(f"--adapter {adapters[0].path}: its base")
    return named_by(
        f"--adapter {trusted.path}: its base",
        f"the run that made {trusted.path.parent} trusted its base's code; pass --trust-remote-code if you do too",
    )


def load(
    adapters: list[Adapter],
    model: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    flag: str = "--base",
) -> tuple[Any, Any]:
    """(model, tokenizer) ready for generation: the base (`model`, named `flag` on the command line, else the
    adapters') with every adapter loaded by name, the first active. With no adapters the plain base is returned."""
    from philora.model.load import load_model, load_tokenizer, without_bitsandbytes

    section = base_section(adapters, model, dtype, trust_remote_code)
    with base_named(adapters, model, flag), without_bitsandbytes():  # the base is never quantised here
        tokenizer = load_tokenizer(section)
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
