"""`philora export gguf|ollama`: a merged Phi-3 model as one GGUF file (f16 or Q8_0), or as an Ollama directory
(the GGUF and a Modelfile), verified by reading it back.

Verification loads the written file with transformers' own GGUF reader (`from_pretrained(..., gguf_file=...)`,
model and tokenizer), which rebuilds config, weights and tokenizer from the GGUF metadata alone, and compares:
- the tokenizer: the chat-rendered parity prompts and a few awkward strings (digit runs, space runs, non-ASCII)
  must give the same ids as the source tokenizer, and the chat template must be the same. Two llama.cpp rules
  that transformers' reader leaves out are applied to it first (see gguf_vocab.as_llama_cpp_reads_it);
- the logits on those prompts with the source model's, both in fp32, relative to the logit scale (as in merge):
  f16 within 1e-2 (measured 1.1e-3 on the embedded model); Q8_0 within 1e-1 (measured 3.3e-2 — int8 values
  with one scale per 32 weights, compounded over 30 layers, at the worst of ~6M logits; top-1 tokens agree 99%).
transformers' reader ignores `rope.dimension_count` and the longrope factors, so a partial-rotary or longrope
model's weights are loaded into the source config instead; the output and export.json say so.
The numbers go to a line on stderr and to a sidecar: DIR/export.json for ollama, NAME.export.json beside NAME.gguf.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from philora.errors import UserError
from philora.export.merge import Parity, compare, logits_of, parity_line, parity_prompts

TOLERANCE = {"f16": 1e-2, "q8_0": 1e-1}
# Text whose tokenisation depends on the pre-tokenizer: digit runs, space runs, contractions, non-ASCII.
TOKENIZER_PROBES = [
    "In 2024, 12345 people paid $3.50 each — didn't they?",
    "  two  spaces,\ttab\nnewline  ",
    "Grüße, naïve café: 東京 🚀",
]
OLLAMA_GGUF = "model.gguf"


def main(args: argparse.Namespace) -> int:
    source = check_source(Path(args.model).expanduser())
    gguf_path, sidecar = output_paths(args.format, Path(args.output).expanduser())
    started, folder_existed = time.time(), gguf_path.parent.exists()
    try:
        record = export(source, gguf_path, args.type, ollama=args.format == "ollama")
    except BaseException:
        remove_partial(gguf_path, args.format == "ollama" and not folder_existed)
        raise
    record["seconds"] = round(time.time() - started, 1)
    sidecar.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    parity = Parity(**record["parity"])
    print(parity_line(f"GGUF {args.type}", parity, args.type), file=sys.stderr)
    problems = []
    if not record["tokenizer_identical"]:
        problems.append(f"the GGUF's tokenizer encodes differently from the source's: {record['tokenizer_mismatch']}")
    if not parity.passed:
        problems.append(f"its logits differ by {parity.relative:.2e} of the logit scale (> {parity.tolerance:.0e})")
    for problem in problems:
        print(
            f"philora: error: {gguf_path}: {problem}; do not use it — please report it with {sidecar}", file=sys.stderr
        )
    if problems:
        return 1
    print(f"philora: wrote {gguf_path} ({record['bytes'] / 1e6:.1f} MB)", file=sys.stderr)
    if args.format == "ollama":
        print(f"philora: `cd {gguf_path.parent} && ollama create NAME -f Modelfile`", file=sys.stderr)
    return 0


def check_source(path: Path) -> Path:
    """A merged model directory: config.json, no adapter, and not a merge whose parity check failed."""
    if not path.is_dir():
        raise UserError(f"--model {path}: no such directory; give a merged model dir (philora merge --output)")
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file() or (path / "adapter" / "adapter_config.json").is_file():
            raise UserError(
                f"--model {path}: is an adapter; merge it first (philora merge --adapter {path} --output DIR)"
            )
        raise UserError(f"--model {path}: no config.json; give a merged model dir (philora merge --output)")
    merge_record = path / "merge.json"
    if merge_record.is_file() and not json.loads(merge_record.read_text()).get("passed", True):
        raise UserError(f"--model {path}: its merge failed the parity check (merge.json); merge again")
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
    return output, output.with_suffix(".export.json")


@dataclass
class Source:
    """The model being exported and what verification compares the GGUF with."""

    path: Path
    config: Any
    tokenizer: Any
    encoder: Any  # ChatEncoder: chat template, end-of-turn and stop ids
    vocab: Any  # gguf_vocab.Vocab
    prompts: list[list[int]]
    reference: list[torch.Tensor]  # fp32 logits of the source on `prompts`

    @property
    def gguf_name(self) -> str:
        from philora.export.vocab import gguf_name

        return gguf_name(self.path.resolve().name, self.vocab.rstrip_specials)


def export(path: Path, gguf_path: Path, qtype: str, *, ollama: bool) -> dict[str, Any]:
    """Write the GGUF (and Modelfile), verify it, and return the export.json record."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from philora.config import ModelSection
    from philora.data.render import ChatEncoder
    from philora.export.gguf import check_phi3, write_gguf
    from philora.export.vocab import build_vocab
    from philora.model.load import load_tokenizer

    config = AutoConfig.from_pretrained(path)
    check_phi3(config, f"--model {path}")
    tokenizer = load_tokenizer(ModelSection(name_or_path=str(path)))
    encoder = ChatEncoder(tokenizer)
    vocab = build_vocab(tokenizer, config.vocab_size, encoder.end_of_turn_id)
    shape = ollama_shape(encoder) if ollama else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = parity_prompts(encoder)
    source = Source(path, config, tokenizer, encoder, vocab, prompts, logits_of(model, prompts))
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(gguf_path, source.gguf_name, config, model.state_dict(), vocab, qtype)
    del model
    stops = [tokenizer.convert_ids_to_tokens(i) for i in encoder.stop_ids]
    if shape is not None:
        from philora.export.ollama import modelfile

        text = modelfile(shape, gguf_path.name, stops, config.max_position_embeddings, str(path))
        (gguf_path.parent / "Modelfile").write_text(text)
    check = verify(gguf_path, source, qtype)
    return {
        "source": str(path),
        "gguf": str(gguf_path),
        "type": qtype,
        "bytes": gguf_path.stat().st_size,
        "name": source.gguf_name,
        "stop_tokens": stops,
        "eot_token_id": encoder.end_of_turn_id,
        "tokenizer_model": vocab.model,
        "tokenizer_pre": vocab.pre,
        **check,
        "passed": check["tokenizer_identical"] and Parity(**check["parity"]).passed,
    }


def ollama_shape(encoder: Any) -> Any:
    from philora.export.ollama import chat_shape

    end_of_turn = encoder.tokenizer.convert_ids_to_tokens(encoder.end_of_turn_id)
    return chat_shape(encoder.render, end_of_turn)


def verify(gguf_path: Path, source: Source, qtype: str) -> dict[str, Any]:
    """Read the GGUF back with transformers and compare its tokenizer and logits with the source's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from philora.export.vocab import as_llama_cpp_reads_it

    with tempfile.TemporaryDirectory() as folder:  # nothing beside the file that transformers could pick up
        name = gguf_path.name
        (Path(folder) / name).symlink_to(gguf_path.resolve())
        loaded = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        as_llama_cpp_reads_it(loaded, source.gguf_name, source.vocab.pre)
        mismatch = tokenizer_mismatch(source.tokenizer, loaded, source.encoder)
        kwargs: dict[str, Any] = {}
        how = "transformers from_pretrained(gguf_file=...): config, weights and tokenizer from the GGUF"
        if needs_source_config(source.config):
            kwargs["config"] = source.config
            how = "transformers from_pretrained(gguf_file=..., config=source's): its GGUF reader drops rope settings"
            print(f"philora: verifying with the source config ({how.split(': ')[1]})", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs).eval()
        parity = compare(source.reference, logits_of(model, source.prompts), TOLERANCE[qtype])
    return {
        "verified_with": how,
        "parity": asdict(parity),
        "tokenizer_identical": mismatch is None,
        "tokenizer_mismatch": mismatch,
        "prompts": len(source.prompts),
    }


def needs_source_config(config: Any) -> bool:
    from philora.export.gguf import rope_settings

    rope = rope_settings(config)
    return rope["rope_type"] != "default" or float(rope["partial_rotary_factor"]) != 1.0


def tokenizer_mismatch(source: Any, loaded: Any, encoder: Any) -> str | None:
    """None when the GGUF's tokenizer encodes the parity prompts and probes exactly like the source; else the
    first text that differs."""
    from philora.export.merge import PARITY_CONVERSATIONS

    texts = [encoder.render(m, True) for m in PARITY_CONVERSATIONS] + TOKENIZER_PROBES
    for text in texts:
        want = source(text, add_special_tokens=False)["input_ids"]
        got = loaded(text, add_special_tokens=False)["input_ids"]
        if want != got:
            return f"{text[:40]!r}: {want[:12]}… vs {got[:12]}…"
    if (loaded.chat_template or None) != (source.chat_template or None):
        return "the chat template differs"
    return None


def remove_partial(gguf_path: Path, remove_folder: bool) -> None:
    """Remove what a failed export wrote (the output was new or an empty dir, so all of it is ours)."""
    gguf_path.unlink(missing_ok=True)
    (gguf_path.parent / "Modelfile").unlink(missing_ok=True) if gguf_path.name == OLLAMA_GGUF else None
    if remove_folder and gguf_path.parent.is_dir() and not any(gguf_path.parent.iterdir()):
        gguf_path.parent.rmdir()
