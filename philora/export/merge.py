"""`philora merge`: fold an adapter into its full-precision base and prove the result answers the same.

The base is held in its checkpoint's own dtype (for a QLoRA adapter: the original weights, not a de-quantised 4-bit
copy), read tensor by tensor. Each adapted layer is merged by peft (`merge(safe_merge=True)`) on an fp32 copy of
its weight, which is then cast to the dtype the model is saved in: `--dtype`, else the dtype the run trained in
(run.json), else the base checkpoint's own dtype. The merged model is saved as sharded safetensors with the
tokenizer, its chat template and a generation config that stops on the end-of-turn token.

Parity: the saved model is read back from disk and its logits on a few chat-rendered prompts are compared with
the unmerged base + adapter (the adapter as trained). Both compute in fp32 (model.upcast: each module's weights
cast up as it runs, exact for bf16), so what is measured is the merge and the rounding of the saved weights, not
the noise of low-precision arithmetic. One model is held at a time, in its stored dtype: the peak is about the
larger of the base and the merged model as stored, plus one layer in fp32 and the libraries (a 3.8B bf16 model:
about 9 GB, where holding it in fp32 took 16).

The max abs difference is judged relative to the logits' scale (max |logit| of the reference): fp32 must agree to
1e-4 of it (measured 2.2e-6 on the embedded model with a rank-8 adapter on every projection); bf16 and fp16
weights round every matrix to 8 and 11 significant bits, so they get 5e-2 and 1e-2 (measured 7.7e-3 and 1.1e-3).
The numbers go to a line on stderr and to OUTPUT/merge.json; a failed check exits 1 and records `passed: false`,
which export refuses. A merge that passes gets a README.md model card (export/card.py) from merge.json and the
adapter's run records.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from philora import heap
from philora.errors import UserError
from philora.export.card import write_card
from philora.export.howto import after_merge
from philora.flags import BASE, typed
from philora.hardware import DTYPES, resident_bytes
from philora.infer.adapters import Adapter, base_named, base_section, read_adapter
from philora.model.load import from_pretrained, read_not_mapped, without_bitsandbytes
from philora.model.upcast import fp32_compute
from philora.paths import umask_modes

# Max |diff| / max |reference logit| allowed, by the dtype the merged weights are saved in.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
# Initialisations whose adapters only make sense on a base they rewrote; `philora train` saves them converted
# to plain LoRA (init_lora_weights: true), an adapter saved unconverted still names them.
NEEDS_REWRITTEN_BASE = ("pissa", "olora", "corda", "loftq")
# Conversations the parity check renders with the model's own chat template (generation prompt on).
PARITY_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain LoRA."}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name 2 colours."},
    ],
]


@dataclass
class Parity:
    """How far two models' logits are apart on the parity prompts."""

    max_abs_diff: float
    logit_scale: float  # max |logit| of the reference
    relative: float  # max_abs_diff / logit_scale
    tolerance: float  # allowed `relative`
    top1_agreement: float  # fraction of positions whose argmax token is the same
    positions: int

    @property
    def passed(self) -> bool:
        return self.relative <= self.tolerance


def main(args: argparse.Namespace) -> int:
    heap.limit_slack()  # a model loaded, computed with once and written: memory, not speed, is what counts here
    adapter = read_adapter(args.adapter)
    check_adapter_kind(adapter)
    output = check_output_dir(Path(args.output).expanduser())
    max_shard_size = parse_size(args.max_shard_size)
    # sdpa on both sides of the parity check, whatever attention the run trained with (flash-attn needs a GPU).
    base = base_section([adapter], args.base, "auto", args.trust_remote_code)
    section = replace(base, attn_implementation="sdpa")
    started = time.time()
    # the base is never quantised here; one that cannot load is named by the flag typed, or by the adapter
    with without_bitsandbytes(), base_named([adapter], args.base, typed(args, "base", BASE)):
        report = merge(adapter, section, output, args.dtype or adapter.dtype or "auto", max_shard_size)
    report["seconds"] = round(time.time() - started, 1)
    (output / "merge.json").write_text(json.dumps(report, indent=2) + "\n")
    parity = Parity(**report["parity"])
    print(parity_line(f"merge ({report['dtype']} weights read back vs base + adapter)", report["parity"]),
          file=sys.stderr)  # fmt: skip
    if not parity.passed:
        print(
            f"philora: error: the merged model in {output} does not reproduce base + adapter (relative diff "
            f"{parity.relative:.2e} > {parity.tolerance:.0e}); do not use it. Try --dtype float32; if that fails too, "
            "this is a bug: please report it with merge.json",
            file=sys.stderr,
        )
        return 1
    write_card(output)
    print(f"philora: merged model in {output}", file=sys.stderr)
    print(after_merge(output), file=sys.stderr)
    return 0


def merge(adapter: Adapter, section: Any, output: Path, dtype: str, max_shard_size: int) -> dict[str, Any]:
    """Merge, save and check; returns the merge.json record."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from philora.data.render import ChatEncoder
    from philora.model.load import load_model, load_tokenizer, model_source

    tokenizer = load_tokenizer(section)
    encoder = ChatEncoder(tokenizer)  # gives a Phi-3 tokenizer without a template the official one
    source = model_source(section)
    stored = stored_dtype(source, section)
    target = stored if dtype == "auto" else dtype
    base = load_model(replace(section, dtype=stored), training=False)
    try:
        model = PeftModel.from_pretrained(base, str(adapter.path)).eval()
    except (RuntimeError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"--adapter {adapter.path}: does not fit the base model {source}: {first} — pass the --base it was "
            "trained on"
        ) from None
    prompts = parity_prompts(encoder)
    reference = logits_of(model, prompts)
    with model.disable_adapter():  # on the first prompt: enough to show the adapter changes the answers
        effect = compare(reference[:1], logits_of(model, prompts[:1]), float("inf"))
    merged = merge_weights(model, adapter.path, DTYPES[target])
    del model, base
    merged.to(DTYPES[target])
    check_finite(merged, adapter.path, target)  # after the cast: fp16 overflows to inf past 65504
    save_merged(merged, tokenizer, encoder.stop_ids, output, max_shard_size)
    del merged
    # a base with its own code saves it beside the weights (save_pretrained copies it): run only when trusted
    trust = section.trust_remote_code
    with read_not_mapped(reference[0].device):
        reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=DTYPES[target], trust_remote_code=trust)
    reloaded = reloaded.to(reference[0].device).eval()
    parity = compare(reference, logits_of(reloaded, prompts), TOLERANCE[target])
    return {
        "adapter": str(adapter.path.resolve()),  # absolute: the model card finds the adapter's run from anywhere
        "base": source,
        "base_trained_quantization": adapter.model.quantization,
        "dtype": target,
        "prompts": len(prompts),
        "parity": asdict(parity),
        "passed": parity.passed,
        "adapter_effect_max_abs_diff": effect.max_abs_diff,  # base vs base + adapter: > 0 makes parity mean something
        "stop_token_ids": encoder.stop_ids,
        "peak_memory_mb": round(resident_bytes("VmHWM") / 2**20, 1),
    }


def check_adapter_kind(adapter: Adapter) -> None:
    """Refuse adapters that cannot be merged onto the original base weights."""
    config = json.loads((adapter.path / "adapter_config.json").read_text())
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(NEEDS_REWRITTEN_BASE):
        raise UserError(
            f"--adapter {adapter.path}: a {init} adapter saved unconverted only fits the base it rewrote, not the "
            "original weights; save it converted (peft's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...), as `philora train` does) and merge that"
        )
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"--adapter {adapter.path}: peft_type {config['peft_type']} is not LoRA; merge needs LoRA")


def check_output_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise UserError(f"--output {path}: is a file; give a new or empty directory")
    if path.is_dir() and any(path.iterdir()):
        held = "a model" if (path / "config.json").exists() else "files"
        raise UserError(f"--output {path}: already holds {held}; give a new or empty directory")
    return path


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count → bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"--max-shard-size {text}: not a size; use e.g. 2GB, 500MB or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def stored_dtype(source: str, section: Any) -> str:
    """The base checkpoint's own dtype (its config's), float32 where it names none: the base is held in it, and the
    merged weights are saved in it unless --dtype or the run says otherwise."""
    from transformers import AutoConfig

    config = from_pretrained(AutoConfig, source, section, "config")
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(stored).removeprefix("torch.") if stored is not None else "float32"
    return name if name in DTYPES else "float32"


def parity_prompts(encoder: Any) -> list[list[int]]:
    """Token ids of the parity conversations, each ending in the generation prompt."""
    return [encoder.ids(messages, generation_prompt=True) for messages in PARITY_CONVERSATIONS]


@torch.no_grad()
def logits_of(model: Any, prompts: list[list[int]]) -> list[torch.Tensor]:
    """fp32 logits of every position of each prompt (one at a time: no padding to get wrong), computed in fp32
    whatever dtype the weights are held in."""
    device = next(model.parameters()).device
    with fp32_compute(model):
        return [model(torch.tensor([ids], device=device)).logits[0].float() for ids in prompts]


def compare(reference: list[torch.Tensor], other: list[torch.Tensor], tolerance: float) -> Parity:
    ref, got = torch.cat(reference), torch.cat([o.to(reference[0].device) for o in other])
    diff = float((ref - got).abs().max())
    scale = float(ref.abs().max())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    return Parity(diff, scale, diff / scale if scale else diff, tolerance, top1, ref.shape[0])


def parity_line(what: str, parity: dict[str, Any]) -> str:
    """The one line every parity check prints, merge's and export's (gguf, ollama, gguf-lora) alike: the largest
    |Δlogit| (absolute, and relative to the logit scale, which a tolerance bounds), the top-1 agreement (which a
    floor bounds, for 4- and 5-bit GGUF types), over how many positions, and the verdict. `parity` is a Parity as a
    dict (merge.json's, export.json's), with `tolerance` and `top1_floor` None where they do not judge."""
    tolerance, floor = parity.get("tolerance"), parity.get("top1_floor")
    ok = (tolerance is None or parity["relative"] <= tolerance) and (floor is None or parity["top1_agreement"] >= floor)
    bound = f", tolerance {tolerance:.2g}" if tolerance is not None else ""
    top1 = f"top-1 agreement {parity['top1_agreement']:.1%}" + (f" (floor {floor:.0%})" if floor is not None else "")
    return (
        f"philora: {what} parity: max |Δlogit| {parity['max_abs_diff']:.3g} ({parity['relative']:.1e} of the logit "
        f"scale{bound}), {top1} over {parity['positions']} positions: {'ok' if ok else 'FAILED'}"
    )


def merge_weights(model: Any, adapter_path: Path, dtype: torch.dtype) -> Any:
    """peft's safe merge (it checks each merged matrix for NaN) of each adapted layer on an fp32 copy of its weight,
    cast to `dtype` as soon as it is merged, after checking the adapter's own tensors; then the adapter's layers
    removed."""
    from peft.tuners.lora import LoraLayer

    bad = [n for n, p in model.named_parameters() if "lora_" in n and not finite(p)]
    if bad:
        raise UserError(
            f"--adapter {adapter_path}: {len(bad)} adapter tensors hold NaN or inf (first: {bad[0]}); the training "
            "run diverged — merge an earlier checkpoint or retrain with a lower learning rate"
        )
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        weight = layer.get_base_layer().weight
        weight.data = weight.data.float()
        try:
            layer.merge(safe_merge=True)
        except ValueError as e:
            if "NaN" not in str(e):
                raise
            raise UserError(f"--adapter {adapter_path}: merging it gives NaN weights; the adapter is broken") from None
        weight.data = weight.data.to(dtype)
    return model.unload()


def check_finite(model: Any, adapter_path: Path, dtype: str) -> None:
    """Refuse to save a merged model with any NaN or inf weight."""
    bad = [n for n, p in model.named_parameters() if not finite(p)]
    if bad:
        hint = "; try --dtype bfloat16 or float32" if dtype == "float16" else ""
        raise UserError(
            f"--adapter {adapter_path}: the merged {dtype} weights hold NaN or inf ({len(bad)} tensors, first: "
            f"{bad[0]}); refusing to save them{hint}"
        )


def finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in `tensor`. A sum is NaN/inf when any element is (and is cheap); only then look closer, since a
    sum of huge finite values can overflow too."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def save_merged(model: Any, tokenizer: Any, stop_ids: list[int], output: Path, max_shard_size: int) -> None:
    """Sharded safetensors, tokenizer + chat template, and a generation config that stops at the end of a turn."""
    config = model.generation_config
    current = config.eos_token_id
    eos = [current] if isinstance(current, int) else list(current or [])
    config.eos_token_id = sorted(set(eos) | set(stop_ids))
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(output)
    umask_modes(output)
