"""How much memory one training step takes on this device, before anything is loaded.

Weights, adapter, gradients and optimizer state follow from the parameter counts. Activations are counted, not
guessed: one forward pass of the decoder runs on the meta device (shapes only, no memory, no arithmetic) with a
hook on every tensor autograd saves for backward, so each architecture's own layers, norms, dropout and
attention say what they keep. Attention is counted as the fused kernels philora runs (SDPA's flash/efficient
paths keep query, key, value, output and one log-sum-exp per row), not as the meta device's reference path,
which would keep the whole score matrix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from philora import hardware
from philora.config import Config
from philora.data.batching import row_width
from philora.model.loss import CHUNK, TokenLoss
from philora.model.packed_attention import kept_probabilities, matmul_attention
from philora.preflight.architecture import Architecture

GIB = 1024**3
# bitsandbytes NF4 with double quantisation: 4 bits a weight, an 8-bit scale per 64 weights, and an fp32 scale
# per 256 of those; LLM.int8: a byte a weight (its per-row fp32 scales are negligible).
BYTES_PER_WEIGHT = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}
# On a CPU, glibc's heap keeps some of what a step frees: the forward pass's temporaries sit between the tensors
# saved for backward, so the holes are not returned to the system and the resident size peaks above the live
# tensors. As a fraction of the bytes one forward pass saves, with the embedded model in fp32 (resident peak minus
# the estimate's other parts; 1x384 to 2x2048 tokens, with and without checkpointing): 0.08 to 0.16 since the
# fast path's rotation, dropout and norms leave few temporaries (it was 0.28 to 0.68 before), varying by some 10%
# between identical runs.
HEAP_SLACK = 0.15


@dataclass
class Saved:
    """Bytes autograd keeps for backward: in total, and added inside each decoder layer."""

    total: int
    per_layer: list[int]
    layer_input: int  # one decoder layer's input, what a checkpointed layer keeps


@dataclass
class Estimate:
    """One training step's peak memory on one process, by part, in bytes."""

    parts: dict[str, int]
    device: str
    capacity: int | None  # the device's memory
    available: int | None  # what is free for this run now

    @property
    def total(self) -> int:
        return sum(self.parts.values())


class _FusedAttention(torch.autograd.Function):
    """Stands in for SDPA on the meta device, saving what the fused kernels save; with `probabilities`, also the
    most packed_attention.CausalAttention keeps for a row's samples (`kept_probabilities`)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probabilities: bool,
                *mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        kept = [q.new_empty(*q.shape[:-2], kept_probabilities(q.shape[-2], q.dtype))] if probabilities else []
        ctx.save_for_backward(q, k, v, out, lse, *kept, *mask)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:  # pragma: no cover - the meta pass never runs backward
        raise NotImplementedError


@contextlib.contextmanager
def _on_meta(packed: bool, probabilities: bool) -> Iterator[None]:
    """SDPA counted as the fused kernels; packed rows' block-diagonal mask made as a packed run makes it (transformers
    decides whether rows are packed by looking at the position ids' values, which the meta device has not)."""
    from transformers import masking_utils

    def fused_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, **_: Any) -> torch.Tensor:
        mask = [attn_mask] if isinstance(attn_mask, torch.Tensor) else []
        return _FusedAttention.apply(q, k, v, probabilities, *mask)

    sdpa, find_packed = torch.nn.functional.scaled_dot_product_attention, masking_utils.find_packed_sequence_indices
    torch.nn.functional.scaled_dot_product_attention = fused_sdpa
    masking_utils.find_packed_sequence_indices = lambda positions: (positions != -1).cumsum(-1) if packed else None
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        masking_utils.find_packed_sequence_indices = find_packed


def saved_for_backward(arch: Architecture, batch: int, length: int, packed: bool) -> Saved:
    """Count what the decoder saves for backward on a (batch x length) micro-batch, on the meta device."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    # training with sdpa attends per sample (model.packed_attention), keeping probabilities where it uses matmuls
    probabilities = arch.attention == "sdpa" and matmul_attention(arch.dtype, hardware.device().type)
    model = arch.model
    model.train()
    decoder = model.get_base_model().get_decoder()
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    sizes: dict[int, int] = {}
    marks: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:  # frozen weights are saved by reference and cost nothing extra
            sizes[storage._cdata] = max(sizes.get(storage._cdata, 0), storage.nbytes())
        return t

    layers = [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    inputs: list[int] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: marks.append(sum(sizes.values())), with_kwargs=True)
             for layer in layers] + [layer.register_forward_hook(lambda *_: marks.append(sum(sizes.values())))
             for layer in layers]  # fmt: skip
    hooks.append(layers[0].register_forward_pre_hook(
        lambda m, a, k: inputs.append((a[0] if a else k["hidden_states"]).nbytes), with_kwargs=True))  # fmt: skip
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    positions = torch.arange(length, device="meta").expand(batch, length)
    try:
        with _on_meta(packed, probabilities), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            decoder(input_ids=ids, position_ids=positions, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    per_layer = [marks[2 * i + 1] - marks[2 * i] for i in range(len(layers))]
    return Saved(sum(sizes.values()), per_layer, inputs[0] if inputs else 0)


def estimate(config: Config, arch: Architecture) -> Estimate:
    """The peak of one training step per the config's micro-batch, length, checkpointing and quantization."""
    tc, mc = config.training_config, config.model
    batch, length = tc.per_device_train_batch_size, row_width(tc.method, config.data.max_length)
    size = arch.dtype.itemsize
    model = arch.model
    adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if mc.quantization is None:
        weights = sum(p.numel() * p.element_size() for p in model.get_base_model().parameters() if not p.requires_grad)
    else:
        other = arch.parameters - arch.linear_parameters
        weights = int(arch.linear_parameters * BYTES_PER_WEIGHT[mc.quantization]) + other * size
    saved = saved_for_backward(arch, batch, length, config.data.packing)
    activations = saved.total
    layer = max(saved.per_layer, default=0)
    # backward's working set: the gradient flowing down the residual stream, and one layer's gradients, which
    # is what a checkpointed layer's recomputation holds too
    working = 2 * batch * length * arch.hidden_size * 4 + layer
    if tc.gradient_checkpointing:
        kept = round(len(saved.per_layer) * tc.gradient_checkpointing_layers)
        activations += kept * (saved.layer_input - layer)  # a checkpointed layer keeps only its input
    trained = batch * length  # at most every position is trained
    if TokenLoss(model).chunked:
        # the chunked head keeps the trained positions' hidden-state gradient and one chunk of fp32 logits (plus
        # the chunk in the weights' dtype while it is cast up, when that is narrower)
        cast = size if size < 4 else 0
        head = trained * arch.hidden_size * size + min(CHUNK, trained) * arch.vocab_size * (4 + cast)
    else:  # a trained head: every position's logits, their fp32 copy and their gradient
        head = trained * arch.vocab_size * (size + 8)
    parts = {
        "weights": weights,
        "adapter": adapter,
        "gradients": adapter,
        "optimizer": 2 * adapter,
        "activations": activations,
        "loss head": head,
        "backward working set": working,
    }
    device, capacity, available, runtime = device_memory()
    if device == "cpu":
        parts["heap slack"] = int(HEAP_SLACK * saved.total)
    parts["runtime"] = runtime
    return Estimate(parts, device, capacity, available)


def device_memory() -> tuple[str, int | None, int | None, int]:
    """(device, its memory, what is free now, what this process already holds that a run holds too):
    on a GPU, CUDA's figures (the process's own part is not in the allocator's peak); on a CPU, RAM and this
    process's resident size (the libraries every run imports)."""
    dev = hardware.device()
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return torch.cuda.get_device_name(dev), total, free, 0
    info = _meminfo()
    rss = hardware.resident_bytes()
    available = info.get("MemAvailable")
    return "cpu", info.get("MemTotal"), available + rss if available is not None else None, rss


def _meminfo() -> dict[str, int]:
    try:
        with open("/proc/meminfo") as f:
            return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)}
    except OSError:
        return {}
