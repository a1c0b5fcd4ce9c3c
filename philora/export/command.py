"""`philora export gguf|ollama`: a merged model as one GGUF file in any of llama.cpp's usual types, or as an
Ollama directory (the GGUF and a Modelfile), verified by llama.cpp itself.

Types and who writes them: f16, bf16 and q8_0 by gguf-py here (gguf.py: Q8_0 is the same block format llama.cpp
writes); q5_k_m, q4_k_m and q4_0 by llama.cpp's own quantizer (`llama_model_quantize`, what llama-quantize runs),
from an f16 file written first — its per-tensor mixture (q6_k for the output head, q5_0/q8_0 fallbacks where a
row is not a multiple of 256) is llama.cpp's, as in every Ollama download.

Verification loads the written file in llama.cpp (llama-cpp-python) and compares it with the source model in
transformers, fp32:
- tokens: the chat-rendered parity prompts and some awkward strings (digit runs, space runs, non-ASCII) must give
  the same ids, and the file's chat template rendered by llama.cpp's Jinja handling the same prompt text;
- logits over every prompt position: for the float types and q8_0 the largest |Δlogit| must stay within a bound
  relative to the logit scale (f16 1e-2, bf16 5e-2, q8_0 0.15; measured on the embedded model 1.7e-3, 8.2e-3,
  5.0e-2); for the 4- and 5-bit types the top-1 token must agree at least as often as a floor (q5_k_m and q4_k_m
  70%, q4_0 50%; measured 82-86%, 91%, 66-73%). The floors are set on the embedded 135M model, the worst case (small
  models lose most to quantization), and far above what a wrong layout or tokenizer gives (a few percent);
- greedy answers to the parity conversations through llama.cpp's chat completion, beside transformers' answers,
  and whether llama.cpp stopped at the end of turn where transformers did (reported, not judged: one near-tie
  flips a greedy answer);
- longrope models: logits past the original context, where both switch to the long factors.
The numbers go to a line on stderr and to a sidecar: DIR/export.json for ollama, NAME.export.json beside NAME.gguf.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from philora import heap
from philora.errors import UserError
from philora.flags import BASE, MERGED, remember, typed, warn_deprecated
from philora.model.load import named_by
from philora.paths import HUB_ID

OLLAMA_GGUF = "model.gguf"


def main(args: argparse.Namespace) -> int:
    from philora.export import howto

    heap.limit_slack()  # a model loaded, computed with once and written: memory, not speed, is what counts here
    old_spellings(args)
    flag = source_flag(args)
    source = check_source(Path(getattr(args, flag.dest)).expanduser(), flag.typed, flag.dest)
    gguf_path, sidecar = output_paths(args.format, Path(args.output).expanduser())
    started, folder_existed = time.time(), gguf_path.parent.exists()
    try:
        with named_by(flag.typed):
            record = export(source, gguf_path, args.type, ollama=args.format == "ollama",
                            trust=args.trust_remote_code, label=f"{flag.typed} {source}")  # fmt: skip
    except BaseException:
        remove_partial(gguf_path, args.format == "ollama", args.format == "ollama" and not folder_existed)
        raise
    status = conclude(record, f"GGUF {args.type}", gguf_path, sidecar, started)
    if status == 0:
        usage = howto.after_ollama(gguf_path.parent) if args.format == "ollama" else howto.after_gguf(gguf_path)
        print(usage, file=sys.stderr)
    return status


@dataclass(frozen=True)
class Flag:
    dest: str  # where argparse put it: merged or base
    typed: str  # as the user typed it, for messages


def source_flag(args: argparse.Namespace) -> Flag:
    """The model `export gguf|ollama` converts: --merged DIR (a merge's output), or --base DIR (a base as it is,
    e.g. for a GGUF LoRA to apply to); never an adapter, which needs merging or gguf-lora."""
    given = [dest for dest in ("merged", "base") if getattr(args, dest)]
    if args.adapter:
        raise UserError(
            f"export {args.format}: {typed(args, 'adapter', '--adapter')} {args.adapter}: an adapter is exported by "
            f"`philora export gguf-lora`; or merge it first (philora merge --adapter {args.adapter} --output DIR) "
            "and give --merged DIR"
        )
    if args.base_gguf:
        raise UserError(f"export {args.format}: --base-gguf is for gguf-lora; give --merged DIR")
    if not given:
        raise UserError(f"export {args.format}: give --merged DIR, a merged model (philora merge --output)")
    if len(given) == 2:
        both = " and ".join(typed(args, d, f"--{d}") for d in given)
        raise UserError(f"export {args.format}: {both}: give one model to convert, --merged DIR or --base DIR")
    return Flag(given[0], typed(args, given[0], MERGED if given[0] == "merged" else BASE))


def old_spellings(args: argparse.Namespace) -> None:
    """The last release's export flags, each with a warning: --model (the merged dir for gguf and ollama, the base
    for gguf-lora) and gguf-lora's --base FILE.gguf (a base GGUF, now --base-gguf)."""
    if args.format == "gguf-lora" and args.base and args.base.endswith(".gguf") and not args.base_gguf:
        warn_deprecated("--base FILE.gguf", "--base-gguf FILE.gguf")
        remember(args, "base_gguf", typed(args, "base", BASE))
        args.base_gguf, args.base = args.base, None
    if args.old_model is not None:
        dest = "base" if args.format == "gguf-lora" else "merged"
        warn_deprecated("--model", f"--{dest}")
        if getattr(args, dest) is not None:
            raise UserError(f"--model and --{dest}: the same model twice; give --{dest} alone")
        setattr(args, dest, args.old_model)
        remember(args, dest, "--model")


def conclude(record: dict[str, Any], what: str, path: Path, sidecar: Path, started: float) -> int:
    """Write the verification record beside the file and print the verdict: its summary, then each problem as an
    error (exit 1), or where the file is."""
    from philora.export import verify

    record["seconds"] = round(time.time() - started, 1)
    sidecar.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(verify.summary(what, record), file=sys.stderr)
    problems = verify.problems(record)
    for problem in problems:
        print(f"philora: error: {path}: {problem}; do not use it — please report it with {sidecar}", file=sys.stderr)
    if problems:
        return 1
    print(f"philora: wrote {path} ({record['bytes'] / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def check_source(path: Path, flag: str = MERGED, dest: str = "merged") -> Path:
    """A model directory (`dest` merged: a merge's output; base: a base model), named `flag` as typed: config.json,
    no adapter, and not a merge whose parity check failed. Checked before anything loads."""
    give = "give a merged model dir (philora merge --output)" if dest == "merged" else "give the base model's dir"
    if not path.is_dir():
        if dest == "base" and HUB_ID.match(str(path)) and not path.exists():  # export reads files on this machine
            give = f"export converts a model on disk: `hf download {path} --local-dir DIR`, then --base DIR"
        raise UserError(f"{flag} {path}: no such directory; {give}")
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file() or (path / "adapter" / "adapter_config.json").is_file():
            raise UserError(
                f"{flag} {path}: is an adapter; merge it first (philora merge --adapter {path} --output DIR), or "
                "export it as it is with `philora export gguf-lora`"
            )
        raise UserError(f"{flag} {path}: no config.json; {give}")
    merge_record = path / "merge.json"
    if merge_record.is_file() and not json.loads(merge_record.read_text()).get("passed", True):
        raise UserError(f"{flag} {path}: its merge failed the parity check (merge.json); merge again")
    return path


def output_paths(fmt: str, output: Path) -> tuple[Path, Path]:
    """(the .gguf path, the export.json path) for `export gguf FILE` or `export ollama DIR`."""
    if fmt == "ollama":
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise UserError(f"--output {output}: exists and is not an empty directory; give a new one")
        return output / OLLAMA_GGUF, output / "export.json"
    if output.suffix != ".gguf":
        raise UserError(f"--output {output}: name the GGUF file, ending in .gguf")
    if output.exists():
        raise UserError(f"--output {output}: exists; give a new file name or remove it")
    if not output.parent.is_dir():
        raise UserError(f"--output {output}: the directory {output.parent} does not exist")
    sidecar = output.with_suffix(".export.json")
    for beside in (sidecar, f16_scratch(output)):  # written beside the file: never over one that is not ours
        if beside.exists():
            raise UserError(f"--output {output}: {beside.name} beside it exists and would be overwritten; give "
                            "another file name, or move that file")  # fmt: skip
    return output, sidecar


def export(
    path: Path, gguf_path: Path, qtype: str, *, ollama: bool, trust: bool = False, label: str | None = None
) -> dict[str, Any]:
    """Write the GGUF (and Modelfile), verify it in llama.cpp, and return the export.json record. A merged model
    of a base with its own code carries that code: it runs only with `trust` (--trust-remote-code). `label` names
    the model in messages (the flag as typed and the path)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from philora.config import ModelSection
    from philora.data.render import ChatEncoder
    from philora.export import layouts, verify
    from philora.export.vocab import build_vocab, gguf_name
    from philora.model.load import from_pretrained, load_tokenizer, read_not_mapped

    section = ModelSection(name_or_path=str(path), trust_remote_code=trust)
    config = from_pretrained(AutoConfig, str(path), section, "config")
    layout = layouts.layout_of(config, label or str(path))
    tokenizer = load_tokenizer(section)
    encoder = ChatEncoder(tokenizer)
    vocab = build_vocab(tokenizer, config.vocab_size, encoder.end_of_turn_id)
    shape = ollama_shape(encoder) if ollama else None
    with read_not_mapped(torch.device("cpu")):  # the reference runs on the CPU: fp32 without the file's pages too
        model = from_pretrained(AutoModelForCausalLM, str(path), section, "model", dtype=torch.float32).eval()
    ref = verify.reference(model, config, tokenizer, encoder)
    name = gguf_name(path.resolve().name, vocab.rstrip_specials)
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    written_by = write(gguf_path, name, config, model.state_dict(), vocab, qtype)
    del model
    stops = [tokenizer.convert_ids_to_tokens(i) for i in encoder.stop_ids]
    if shape is not None:
        from philora.export.ollama import modelfile

        text = modelfile(shape, gguf_path.name, stops, config.max_position_embeddings, str(path))
        (gguf_path.parent / "Modelfile").write_text(text)
    check = verify.verify(gguf_path, ref, qtype)
    return {
        "source": str(path),
        "gguf": str(gguf_path),
        "type": qtype,
        "written_by": written_by,
        "bytes": gguf_path.stat().st_size,
        "architecture": layout.arch,
        "name": name,
        "stop_tokens": stops,
        "eot_token_id": encoder.end_of_turn_id,
        "tokenizer_model": vocab.model,
        "tokenizer_pre": vocab.pre,
        **check,
        "passed": not verify.problems(check),
    }


def write(gguf_path: Path, name: str, config: Any, state: dict[str, torch.Tensor], vocab: Any, qtype: str) -> str:
    """The file in `qtype`: written directly by gguf-py, or quantized by llama.cpp from an f16 file; says which."""
    from philora.export import llamacpp
    from philora.export.gguf import WRITTEN_HERE, write_gguf

    if qtype in WRITTEN_HERE:
        write_gguf(gguf_path, name, config, state, vocab, qtype)
        return "gguf-py (philora)"
    f16 = f16_scratch(gguf_path)
    try:
        write_gguf(f16, name, config, state, vocab, "f16")
        fallbacks = llamacpp.quantize(f16, gguf_path, qtype)
    finally:
        f16.unlink(missing_ok=True)
    note = f"; {fallbacks}" if fallbacks else ""
    return f"llama.cpp llama_model_quantize ({llamacpp.version()}) from an f16 GGUF{note}"


def ollama_shape(encoder: Any) -> Any:
    from philora.export.ollama import chat_shape

    end_of_turn = encoder.tokenizer.convert_ids_to_tokens(encoder.end_of_turn_id)
    return chat_shape(encoder.render, end_of_turn)


def f16_scratch(gguf_path: Path) -> Path:
    """The f16 GGUF llama.cpp quantizes from, written beside the output and removed after."""
    return gguf_path.with_name(gguf_path.stem + ".f16-tmp.gguf")


def remove_partial(gguf_path: Path, ollama: bool, remove_folder: bool) -> None:
    """Remove what a failed export wrote (the output was new or an empty dir, so all of it is ours)."""
    gguf_path.unlink(missing_ok=True)
    if ollama:  # only in ollama's own dir: a gguf beside a person's Modelfile leaves it alone
        (gguf_path.parent / "Modelfile").unlink(missing_ok=True)
    if remove_folder and gguf_path.parent.is_dir() and not any(gguf_path.parent.iterdir()):
        gguf_path.parent.rmdir()
