"""`philora export gguf-lora`: an adapter in llama.cpp's LoRA format, to apply to a base GGUF the user already has
(`llama-cli -m base.gguf --lora adapter.gguf`, `ADAPTER ./adapter.gguf` in an Ollama Modelfile).

Each adapted projection becomes `blk.N.<tensor>.weight.lora_a` (r × in) and `.lora_b` (out × r) under the base
GGUF's tensor names, f32, with the row transform the base export applies (Llama's q/k rotary order) applied to B.
peft scales each module's update by its own alpha/r (or alpha/√r with rsLoRA, or per-module patterns); that scale
is folded into B and `adapter.lora.alpha` is 0, which llama.cpp reads as "apply B·A as it is" — so every module
keeps its exact scale, and `--lora-scaled F` still multiplies the whole adapter by F.

Verified in llama.cpp: the base GGUF (`--base-gguf FILE`, or an f16 one written from the HF base for the check)
with this adapter applied must agree with transformers' base + adapter by the base file's type floors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from philora.errors import UserError
from philora.export import layouts
from philora.export.layouts import Layout
from philora.flags import BASE, typed

ALPHA_FOLDED = 0.0  # llama.cpp: alpha 0 → scale 1 (B already holds alpha / r)


def main(args: argparse.Namespace) -> int:
    from philora.export import howto
    from philora.export.command import conclude, old_spellings, output_paths
    from philora.export.merge import check_adapter_kind
    from philora.infer.adapters import read_adapter

    old_spellings(args)
    if not args.adapter:
        raise UserError("export gguf-lora: give --adapter DIR (the adapter, or its run dir)")
    if args.merged:
        raise UserError(f"export gguf-lora: {typed(args, 'merged', '--merged')} is for gguf and ollama; give the "
                        "adapter's base as --base M, or leave it out for the adapter's own base")  # fmt: skip
    adapter = read_adapter(args.adapter)
    check_adapter_kind(adapter)
    path, sidecar = output_paths("gguf", Path(args.output).expanduser())
    base_gguf = check_base(args.base_gguf, typed(args, "base_gguf", "--base-gguf"))
    started = time.time()
    try:
        record = export_lora(adapter, args.base, path, base_gguf, args.trust_remote_code, typed(args, "base", BASE))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    status = conclude(record, f"GGUF LoRA on a {record['base_type']} base", path, sidecar, started)
    if status == 0:
        print(howto.after_lora(path, base_gguf, record["base"]), file=sys.stderr)
    return status


def check_base(value: str | None, flag: str) -> Path | None:
    """--base-gguf FILE (named `flag` as typed): a GGUF file, checked before anything loads; None when not given."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        what = "no such file" if not path.exists() else "not a .gguf file"
        raise UserError(f"{flag} {path}: {what}; give the base model's GGUF (philora export gguf --base DIR)")
    return path


def export_lora(
    adapter: Any,
    model_name: str | None,
    path: Path,
    base_gguf: Path | None,
    trust_remote_code: bool = False,
    flag: str = BASE,
) -> dict[str, Any]:
    """Write the LoRA GGUF, verify it on a base GGUF in llama.cpp, and return the export.json record."""
    from philora.data.render import ChatEncoder
    from philora.export import verify
    from philora.export.gguf import write_gguf
    from philora.export.vocab import build_vocab, gguf_name
    from philora.infer.adapters import load

    model, tokenizer = load([adapter], model_name, "float32", trust_remote_code, flag)
    config = model.config
    layout = layouts.layout_of(config, f"--adapter {adapter.path}: its base")
    encoder = ChatEncoder(tokenizer)
    vocab = build_vocab(tokenizer, config.vocab_size, encoder.end_of_turn_id)
    name = gguf_name(f"{Path(str(config.name_or_path)).name}-lora", vocab.rstrip_specials)
    write_lora(path, name, layout.arch, lora_tensors(model, config, layout))
    ref = verify.reference(model, config, tokenizer, encoder)
    given = base_gguf
    with tempfile.TemporaryDirectory(dir=path.parent) as folder:
        if base_gguf is None:
            base_gguf = Path(folder) / "base-f16.gguf"
            write_gguf(base_gguf, name, config, base_weights(model), vocab, "f16")
        base_type = file_type(base_gguf)
        del model
        check = verify.verify(base_gguf, ref, base_type if base_type in verify.BOUNDS else "q4_0", lora=path)
    return {
        "adapter": str(adapter.path),
        "gguf": str(path),
        "bytes": path.stat().st_size,
        "architecture": layout.arch,
        "base": str(config.name_or_path),
        "base_gguf": str(given) if given else "an f16 GGUF of the base, written for the check",
        "base_type": base_type,
        **check,
        "passed": not verify.problems(check),
    }


def lora_tensors(model: Any, config: Any, layout: Layout) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, f32 data) of every adapted projection's A and scaled B."""
    from peft.tuners.lora import Linear

    from philora.export.gguf import tensor_name

    out = []
    name = model.active_adapter
    for module_name, module in model.named_modules():
        if not hasattr(module, "lora_A") or name not in module.lora_A:
            continue
        hf_name = module_name.removeprefix("base_model.model.") + ".weight"
        if not isinstance(module, Linear) or module.use_dora.get(name) or module.lora_bias.get(name):
            raise UserError(f"{hf_name}: llama.cpp's LoRA format holds plain LoRA on linear layers only")
        a = module.lora_A[name].weight.detach().float()
        b = module.lora_B[name].weight.detach().float() * module.scaling[name]
        gguf_name = tensor_name(config, layout, hf_name)
        if gguf_name.startswith(("token_embd", "output.")):
            raise UserError(f"{hf_name}: llama.cpp's LoRA format has no place for an adapter on {gguf_name}")
        out.append((f"{gguf_name}.lora_a", a.numpy()))
        out.append((f"{gguf_name}.lora_b", layouts.transform(config, layout, hf_name, b).numpy()))
    if not out:
        raise UserError("the adapter adapts no linear layer; nothing to export")
    return out


def write_lora(path: Path, name: str, arch: str, tensors: list[tuple[str, np.ndarray]]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, ALPHA_FOLDED)
    for tensor_name, data in tensors:
        writer.add_tensor(tensor_name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def base_weights(model: Any) -> dict[str, torch.Tensor]:
    """The base model's own weights from a peft model, under their plain names."""
    return {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}


def file_type(path: Path) -> str:
    """The type name (f16, q4_k_m, …) a GGUF's general.file_type says, or the raw value when it is none of ours."""
    import gguf

    field = gguf.GGUFReader(str(path)).get_field(gguf.Keys.General.FILE_TYPE)
    value = int(field.contents()) if field is not None else -1
    names = {int(t): t.name.removeprefix("MOSTLY_").removeprefix("ALL_").lower() for t in gguf.LlamaFileType}
    return names.get(value, str(value))
