"""llama.cpp itself, through llama-cpp-python: its quantizer, and the runtime every export is verified in.

llama-cpp-python is a source build of llama.cpp (about 7 minutes on 2 cores): `make setup` installs it with the
`gguf` extra and `CMAKE_ARGS=-DGGML_NATIVE=OFF`, since a native build can die with "Illegal instruction" on
virtual machines whose CPU flags differ from the host's. Nothing else in philora needs it.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from philora.errors import UserError

INSTALL = "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install 'philora[gguf]' (a ~7 minute llama.cpp build; make setup does it)"


def library() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"GGUF export checks every file in llama.cpp and needs llama-cpp-python: {INSTALL}") from None
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its load-time chatter goes to stderr otherwise
    return llama_cpp


def version() -> str:
    return f"llama-cpp-python {library().__version__}"


def quantize(source: Path, target: Path, qtype: str) -> str:
    """llama.cpp's `llama_model_quantize` (what the llama-quantize tool runs) from `source` to `target`; returns
    its summary of tensors that fell back to another type (rows not a multiple of the k-quant block), or ""."""
    import gguf

    llama_cpp = library()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{qtype.upper()}"])
    params.nthread = torch.get_num_threads()
    with captured_stderr() as log:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {qtype}: {log[0][-2000:]}")
    found = re.search(r"(\d+ of \d+ tensor\(s\) required fallback quantization)", log[0])
    return found.group(1) if found else ""


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """What is written to stderr meanwhile, by native code (file descriptor 2) and by llama-cpp-python's log
    callback (sys.stderr): the list holds that text once the block ends."""
    sys.stderr.flush()
    saved, python_stderr, text = os.dup(2), sys.stderr, []
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 2)
        sys.stderr = io.StringIO()
        try:
            yield text
        finally:
            captured, sys.stderr = sys.stderr.getvalue(), python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            text.append(log.read() + captured)


class LoadError(Exception):
    """llama.cpp refused to load a file; the message is its own reason."""


@contextmanager
def loaded(path: Path, n_ctx: int, lora: Path | None = None) -> Iterator[Any]:
    """The GGUF loaded by llama.cpp with logits kept for every position, closed afterwards."""
    llama_cpp = library()
    with captured_stderr() as log:  # verbose while loading, so that a refusal comes with llama.cpp's reason
        try:
            model = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                logits_all=True,
                n_threads=torch.get_num_threads(),
                lora_path=str(lora) if lora else None,
                chat_format="chat_template.default",  # the file's template, rendered by Jinja as llama.cpp's --jinja
                verbose=True,
            )
        except ValueError:
            model = None
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    if model is None:
        reasons = [line for line in log[0].splitlines() if re.search(r"error|failed|exception", line, re.I)]
        raise LoadError("; ".join(reasons[-3:]) or f"llama.cpp could not load {path}")
    model.verbose = False
    try:
        yield model
    finally:
        model.close()


def tokenize(model: Any, text: str) -> list[int]:
    """llama.cpp's tokens for `text`: special tokens parsed, no bos added (the chat template writes its own)."""
    return list(model.tokenize(text.encode(), add_bos=False, special=True))


def logits(model: Any, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits at every position of `ids`, from an empty context."""
    model.reset()
    model.eval(ids)
    return torch.from_numpy(np.array(model.scores[: len(ids)], dtype=np.float32))


def render(model: Any, messages: list[dict[str, str]]) -> str:
    """The prompt llama.cpp's chat handling renders from the file's own template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = model.metadata.get("tokenizer.chat_template")
    if not template:
        return ""
    eos, bos = model.token_eos(), model.token_bos()
    formatter = Jinja2ChatFormatter(
        template,
        eos_token=model.detokenize([eos], special=True).decode() if eos >= 0 else "",
        bos_token=model.detokenize([bos], special=True).decode() if bos >= 0 else "",
    )
    return formatter(messages=messages).prompt


def answer(model: Any, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, str]:
    """(greedy answer, finish reason) through llama-cpp-python's chat completion with the file's template."""
    model.reset()
    result = model.create_chat_completion(messages=messages, temperature=0.0, max_tokens=max_tokens, seed=0)
    choice = result["choices"][0]
    return choice["message"]["content"] or "", choice["finish_reason"]
