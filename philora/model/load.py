"""Load a causal LM and its tokenizer: the embedded default, a local directory or a hub id."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from philora import hardware, progress
from philora.config import ModelSection
from philora.errors import UserError
from philora.model import embedded, packed_attention
from philora.paths import names_hub_model

# Pad tokens that are safe to use when the tokenizer's pad is missing or equals its eos / end-of-turn token.
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "<unk>")
END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>")


CONFIG_KEY = "model.name_or_path:"
TRUST_FIX = "pass --trust-remote-code if you trust it"


class ModelRefused(UserError):
    """A model that cannot be loaded as named. `place` precedes its name: the config key unless a command names
    what its user typed instead (--model, an adapter's base) with `named_by`."""

    def __init__(self, source: str, problem: str, place: str = CONFIG_KEY) -> None:
        self.source, self.problem = source, problem
        super().__init__(f"{place} {source}{problem}")

    def at(self, place: str, trust_fix: str) -> ModelRefused:
        return ModelRefused(self.source, self.problem, place)


class RemoteCodeRefused(ModelRefused):
    """A model or tokenizer that needs its own Python code (its config's auto_map), loaded without
    --trust-remote-code; `fix` can say more (that the adapter's run trusted it)."""

    def __init__(self, source: str, place: str = CONFIG_KEY, fix: str = TRUST_FIX) -> None:
        super().__init__(source, f" needs its own Python code to load (auto_map in its config); {fix}", place)

    def at(self, place: str, trust_fix: str) -> ModelRefused:
        return RemoteCodeRefused(self.source, place, trust_fix)


@contextlib.contextmanager
def named_by(place: str, trust_fix: str = TRUST_FIX) -> Iterator[None]:
    """A model that cannot be loaded inside is named by `place` (what precedes its name: `--model`, `--adapter DIR:
    its base`), and a refusal to run its code gives `trust_fix`."""
    try:
        yield
    except ModelRefused as e:
        raise e.at(place, trust_fix) from None


def model_source(mc: ModelSection) -> str:
    """The directory or hub id transformers should load: the embedded model's cache dir when none is named. A local
    path is checked here (it exists, has a config.json), before anything loads: a mistyped one fails at once."""
    if mc.name_or_path is None:
        return str(embedded.embedded_model_dir())
    name = mc.name_or_path
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelRefused(name, " is a file; give the model's directory")
        if not (path / "config.json").is_file():
            raise ModelRefused(name, " has no config.json; is it a Hugging Face model directory?")
        return str(path)
    if not names_hub_model(name):
        raise ModelRefused(name, ": no such directory")
    return name


def from_pretrained(loader: Any, source: str, mc: ModelSection, what: str, **kwargs: Any) -> Any:
    """Call a transformers loader, turning 'not found', 'offline' and 'needs its own code' failures into one clear
    line. `mc.trust_remote_code` is always a bool here: None would let transformers prompt on a terminal."""
    try:
        return loader.from_pretrained(
            source, revision=mc.revision, trust_remote_code=mc.trust_remote_code is True, **kwargs
        )
    except (OSError, ValueError) as e:
        if isinstance(e, ValueError) and "trust_remote_code" in str(e):
            raise RemoteCodeRefused(source) from None
        if not isinstance(e, OSError) and "Repo id" not in str(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelRefused(
            source,
            f": cannot load its {what}{offline}: {first} — give a local model directory, or download it first with "
            f"`hf download {source}`",
        ) from None


def load_tokenizer(mc: ModelSection, *, say_pad: bool = True) -> Any:
    """The model's tokenizer with a pad token that is not its eos/end-of-turn token (so padding can never be
    confused with, or masked as, the token that ends an answer). `say_pad=False` for a tokenizer that only reads
    data, loaded before the model: a bad file then stops the command without the notice before its error."""
    tokenizer, pad = tokenizer_and_pad_notice(mc)
    if say_pad and pad is not None:
        notice(pad)
    return tokenizer


def tokenizer_and_pad_notice(mc: ModelSection) -> tuple[Any, str | None]:
    """`load_tokenizer`'s tokenizer, and its notice about the pad token unsaid (None when there is none): for a
    command that says it once its input has passed its checks."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, model_source(mc), mc, "tokenizer")
    return tokenizer, ensure_safe_pad(tokenizer, say=False)


def ensure_safe_pad(tokenizer: Any, say: bool = True) -> str | None:
    """Replace a pad token that is the eos or end-of-turn token with a safe one, saying so (once a process) unless
    not `say`; returns what it says, or None when the pad was safe."""
    vocab = tokenizer.get_vocab()
    ends = {tokenizer.eos_token_id} | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in ends:
        return None
    for candidate in (tokenizer.unk_token, *PAD_CANDIDATES):
        if candidate and candidate in vocab and vocab[candidate] not in ends:
            old = tokenizer.pad_token
            tokenizer.pad_token = candidate
            instead = f"padding with {candidate!r} (id {vocab[candidate]}) instead"
            line = (f"pad token {old!r} is the end-of-sequence token; {instead}" if old is not None
                    else f"the tokenizer has no pad token; {instead}")  # fmt: skip
            if say:
                notice(line)
            return line
    raise UserError(
        "the tokenizer has no pad token distinct from its eos token, and none of "
        f"{', '.join(PAD_CANDIDATES)} exists in its vocabulary; add one to the tokenizer before training"
    )


@functools.cache
def notice(line: str) -> None:
    """Say `line` once in this process (progress.say: not in a quiet command): a fact about a model that each load
    of it would repeat (a process that runs several commands, or loads a model more than once)."""
    progress.say(line)


def check_attention(mc: ModelSection, dev: torch.device) -> None:
    if mc.attn_implementation != "flash_attention_2":
        return
    if dev.type != "cuda":
        raise UserError("model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa on this machine")
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError(
            "model.attn_implementation: flash_attention_2 needs the flash-attn package: "
            "`pip install flash-attn --no-build-isolation`, or use sdpa"
        )


def _quantization_config(mc: ModelSection, dev: torch.device) -> Any:
    if mc.quantization is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"model.quantization: {mc.quantization} needs bitsandbytes: `pip install 'philora[qlora]'`")
    from transformers import BitsAndBytesConfig

    if mc.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if dev.type == "cpu":  # the run's own dtype: fp32 where bf16 is emulated (a step of a 3.8B model: minutes, not s)
        compute = hardware.resolve_dtype(mc.dtype, dev)
    else:
        compute = torch.bfloat16 if hardware.bf16_is_fast(dev) else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        # FSDP and ZeRO-3 shard tensors of one dtype: packed 4-bit weights then travel as bf16 (not uint8).
        bnb_4bit_quant_storage=torch.bfloat16 if weights_sharded() else torch.uint8,
    )


def weights_sharded() -> bool:
    """Whether `accelerate launch` started this process for FSDP or DeepSpeed ZeRO-3."""
    return (
        os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
        or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    )


def load_model(mc: ModelSection, *, training: bool) -> Any:
    """Load the causal LM on this process's device: dtype resolved (auto = bf16 only where it is fast),
    attention checked, `use_cache` off for training (it only costs memory there) and on for generation."""
    from transformers import AutoModelForCausalLM

    dev = hardware.device()
    check_attention(mc, dev)
    source = model_source(mc)
    kwargs: dict[str, Any] = {
        "dtype": hardware.resolve_dtype(mc.dtype, dev),
        "attn_implementation": mc.attn_implementation,
    }
    if (quant := _quantization_config(mc, dev)) is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
        if weights_sharded():  # the unquantised weights must match the bf16 storage FSDP/ZeRO-3 shard
            kwargs["dtype"] = torch.bfloat16
    with read_not_mapped(dev):
        model = from_pretrained(AutoModelForCausalLM, source, mc, "model", **kwargs)
    if quant is None:
        model.to(dev)
    elif training and dev.type == "cpu":
        keep_4bit_weights_differentiable(model)
    model.config.use_cache = not training
    if training and mc.attn_implementation == "sdpa":  # the same SDPA, one sample at a time on flat packed rows
        packed_attention.register()
        model.set_attn_implementation(packed_attention.NAME)
    return model


@contextlib.contextmanager
def read_not_mapped(dev: torch.device) -> Iterator[None]:
    """Loads on the CPU inside read each safetensors tensor into memory of its own (safetensors' pread backend)
    rather than through transformers' memory map of the whole file.

    Through the map, every page of the file a load converts (bf16 weights loaded as fp32, or quantized to 4 bits)
    stays resident until the whole load ends, on top of the converted weights: a LoRA run of a 3.8B bf16 checkpoint
    in fp32 peaked at 22.9 GB while loading (15.7 GB of weights, most of the 7.9 GB file), a QLoRA run at 12.1 GB
    (2.7 GB of weights). Read tensor by tensor, each read is freed once converted (measured on a 1B shape: fp32
    6.06 -> 4.27 GB, 4-bit 3.74 -> 1.90 GB). transformers chooses the backend itself (pread on Windows and MPS);
    this asks for it on Linux and macOS CPUs too."""
    from transformers import modeling_utils

    opened = getattr(modeling_utils, "safe_open", None)
    if dev.type != "cpu" or opened is None:
        yield
        return

    def read(file: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("device", "cpu") == "cpu" and not args:
            kwargs["backend"] = "pread"
        return opened(file, *args, **kwargs)

    modeling_utils.safe_open = read
    try:
        yield
    finally:
        modeling_utils.safe_open = opened


def keep_4bit_weights_differentiable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference in a model that trains.

    On a CPU with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight in place the first time it runs in eval
    mode without gradients (an evaluation or generation inside the run), and from then on multiplies through a
    kernel that has no backward, in training too: no gradient flows back through any 4-bit weight (only through
    the LoRA branches and the residual stream), silently (bitsandbytes 0.50). Its dequantizing path serves both."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def longrope_boundary(config: Any) -> int | None:
    """The original context of a longrope model (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini), past which it switches
    RoPE factor sets; None for every other model."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) != "longrope":
        return None
    return rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)


@contextlib.contextmanager
def without_bitsandbytes(hide: bool = True) -> Iterator[None]:
    """Keep bitsandbytes unimported while an unquantised model is loaded, wrapped and trained.

    peft imports bitsandbytes whenever it is installed (`import peft` does), and on CPUs with AVX512-BF16 that
    import logs a warning about a kernel it cannot fetch: noise, and a second of start-up, for a run that quantises
    nothing. While hidden, `import bitsandbytes` fails as if it were not installed; afterwards peft's cached "is it
    installed?" answers are cleared, so a quantised load later in the same process finds it again.
    """
    if not hide or sys.modules.get("bitsandbytes") is not None:  # imported already: nothing left to spare
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.modules.pop("bitsandbytes", None)
        import_utils = sys.modules.get("peft.import_utils")
        for name in ("is_bnb_available", "is_bnb_4bit_available"):
            cached = getattr(import_utils, name, None)
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()
