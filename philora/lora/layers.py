"""LoRA layers with loralib's names, arguments, initialisation and state_dict keys — and its defects fixed.

`from philora import lora` works where `import loralib as lora` did: `lora.Linear`, `lora.Embedding`,
`lora.Conv1d/2d/3d`, `lora.MergedLinear`, with `r`, `lora_alpha`, `lora_dropout`, `fan_in_fan_out`,
`merge_weights`, `enable_lora`. A layer adds `scaling * B @ A` (scaling = lora_alpha / r) to its frozen weight;
A and B are initialised as loralib does (Linear/Conv/MergedLinear: A Kaiming-uniform, B zero; Embedding: A zero,
B normal), so a checkpoint of either library loads into the other.

What differs, on purpose:
- merging is explicit, `layer.merge()` / `layer.unmerge()`; `.eval()` merges only with `merge_weights=True`
  (loralib's default, philora's opt-in), and `.train()` then unmerges;
- loading a state dict into a merged layer unmerges first and merges again after, so the base weight is never
  corrupted by a stale update;
- Conv1d and Conv3d work (loralib's shapes only fit Conv2d), with groups;
- MergedLinear takes unequal slices (`slices=[3072, 1024, 1024]` for a GQA qkv) and any `enable_lora`,
  including none enabled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class LoRALayer:
    """The LoRA state shared by every layer: rank, alpha, scaling, dropout and the merged flag."""

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool) -> None:
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r if r > 0 else 0.0
        self.lora_dropout: nn.Module = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights

    # Each layer says where its update goes and what it is.
    def _base_weight(self) -> torch.Tensor:
        return self.weight  # type: ignore[attr-defined]

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, in the layout of the base weight."""
        raise NotImplementedError

    def _has_lora(self) -> bool:
        return hasattr(self, "lora_A")

    def merge(self) -> None:
        """Add the update into the base weight (inference without the extra matmuls)."""
        if not self.merged and self._has_lora():
            with torch.no_grad():
                self._base_weight().add_(self.delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """Take the update back out of the base weight."""
        if self.merged and self._has_lora():
            with torch.no_grad():
                self._base_weight().sub_(self.delta_weight())
        self.merged = False

    def train(self, mode: bool = True) -> Any:
        nn.Module.train(self, mode)  # type: ignore[arg-type]
        if self.merge_weights:
            self.unmerge() if mode else self.merge()
        return self

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        was_merged = self.merged
        self.unmerge()  # the base weight must be the base weight while A, B or the weight itself are replaced
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]
        if was_merged:
            self.merge()


def _kaiming_a_zero_b(module: nn.Module) -> None:
    if hasattr(module, "lora_A"):
        nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
        nn.init.zeros_(module.lora_B)


class _Dense(LoRALayer, nn.Linear):
    """What Linear and MergedLinear share: an nn.Linear (stored (in, out) with fan_in_fan_out) plus A and B."""

    def _setup(
        self, in_features: int, out_features: int, r: int, lora_alpha: float, lora_dropout: float,
        fan_in_fan_out: bool, merge_weights: bool, kwargs: dict[str, Any],
    ) -> None:  # fmt: skip
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights)
        self.fan_in_fan_out = fan_in_fan_out

    def _add_lora(self, shapes: tuple[tuple[int, int], tuple[int, int]] | None) -> None:
        """Create A and B of these shapes (None: no LoRA), freeze the weight, initialise as loralib does (the same
        random draws in the same order), then lay the weight out (in, out) if asked."""
        if shapes is not None:
            self.lora_A = nn.Parameter(self.weight.new_zeros(shapes[0]))
            self.lora_B = nn.Parameter(self.weight.new_zeros(shapes[1]))
            self.weight.requires_grad = False
        self.reset_parameters()
        if self.fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        _kaiming_a_zero_b(self)

    def _t(self, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(0, 1) if self.fan_in_fan_out else w


class Linear(_Dense):
    """nn.Linear plus a rank-r update. `fan_in_fan_out=True` for weights stored (in, out), like GPT-2's Conv1D."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = False,
        **kwargs: Any,
    ) -> None:
        self._setup(in_features, out_features, r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, kwargs)
        self._add_lora(((r, in_features), (out_features, r)) if r > 0 else None)

    def delta_weight(self) -> torch.Tensor:
        return self._t(self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self._t(self.weight), bias=self.bias)
        if self.r > 0 and not self.merged:
            update = self.lora_dropout(x) @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)
            result = result + update * self.scaling
        return result


class Embedding(LoRALayer, nn.Embedding):
    """nn.Embedding plus a rank-r update of the table (no dropout on token ids)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: float = 1,
        merge_weights: bool = False,
        **kwargs: Any,
    ) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, 0.0, merge_weights)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Embedding.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).transpose(0, 1) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.Embedding.forward(self, x)
        if self.r > 0 and not self.merged:
            after_a = F.embedding(
                x, self.lora_A.transpose(0, 1), self.padding_idx, self.max_norm, self.norm_type,
                self.scale_grad_by_freq, self.sparse,
            )  # fmt: skip
            result = result + (after_a @ self.lora_B.transpose(0, 1)) * self.scaling
        return result


class MergedLinear(_Dense):
    """One nn.Linear holding several projections (a fused qkv): LoRA on the slices `enable_lora` marks.

    `slices` gives each projection's output size; without it the outputs split equally (loralib's rule).
    Each enabled slice has its own A (r rows of `lora_A`) and B (its rows of `lora_B`); the others are untouched.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: Sequence[bool] = (False,),
        fan_in_fan_out: bool = False,
        merge_weights: bool = False,
        slices: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        self._setup(in_features, out_features, r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, kwargs)
        self.enable_lora = list(enable_lora)
        if slices is None:
            if out_features % len(self.enable_lora):
                raise ValueError(
                    f"out_features {out_features} does not split into {len(self.enable_lora)} equal slices; "
                    "give the slice sizes with slices=[...]"
                )
            slices = [out_features // len(self.enable_lora)] * len(self.enable_lora)
        if len(slices) != len(self.enable_lora) or sum(slices) != out_features:
            raise ValueError(f"slices {list(slices)} must be one size per enable_lora entry, summing to {out_features}")
        self.slices = list(slices)
        starts = [sum(self.slices[:i]) for i in range(len(self.slices))]
        self._enabled = [(s, n) for s, n, on in zip(starts, self.slices, self.enable_lora, strict=True) if on]
        rows = sum(n for _, n in self._enabled)
        self._add_lora(((r * len(self._enabled), in_features), (rows, r)) if r > 0 and self._enabled else None)

    def _blocks(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(first output row, rows, A_j, B_j) per enabled slice."""
        blocks, b_row = [], 0
        for j, (start, n) in enumerate(self._enabled):
            blocks.append((start, n, self.lora_A[j * self.r : (j + 1) * self.r], self.lora_B[b_row : b_row + n]))
            b_row += n
        return blocks

    def delta_weight(self) -> torch.Tensor:
        delta = self.lora_A.new_zeros((self.out_features, self.in_features))
        for start, n, a, b in self._blocks():
            delta[start : start + n] = b @ a
        return self._t(delta * self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self._t(self.weight), bias=self.bias)
        if self.r > 0 and self._enabled and not self.merged:
            x = self.lora_dropout(x)
            parts, at = [], 0
            for start, n, a, b in self._blocks():
                if start > at:
                    parts.append(result.new_zeros((*result.shape[:-1], start - at)))
                parts.append((x @ a.transpose(0, 1) @ b.transpose(0, 1)) * self.scaling)
                at = start + n
            if at < self.out_features:
                parts.append(result.new_zeros((*result.shape[:-1], self.out_features - at)))
            result = result + torch.cat(parts, dim=-1)
        return result


class ConvLoRA(LoRALayer, nn.Module):
    """A conv (kept as `self.conv`, as loralib keys it) plus a rank-r update of its reshaped weight.

    A is (r*k, in*k^(d-1)) and B is (out/groups*k, r*k) for kernel size k in d dimensions: for Conv2d these are
    loralib's shapes, and for every d, B @ A has exactly as many entries as the kernel (which loralib's 2-D shapes
    only have for Conv2d).
    """

    conv_type: type[nn.Module]
    dims: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = False,
        **kwargs: Any,
    ) -> None:
        nn.Module.__init__(self)
        if not isinstance(kernel_size, int):
            raise TypeError(f"kernel_size must be an int for LoRA convolutions, got {kernel_size!r}")
        self.conv = self.conv_type(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights)
        if r > 0:
            k, groups = kernel_size, self.conv.groups
            self.lora_A = nn.Parameter(self.conv.weight.new_zeros((r * k, in_channels * k ** (self.dims - 1))))
            self.lora_B = nn.Parameter(self.conv.weight.new_zeros((out_channels // groups * k, r * k)))
            self.conv.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        _kaiming_a_zero_b(self)

    def _base_weight(self) -> torch.Tensor:
        return self.conv.weight

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r > 0 and not self.merged:
            return self.conv._conv_forward(x, self.conv.weight + self.delta_weight(), self.conv.bias)
        return self.conv(x)


class Conv1d(ConvLoRA):
    conv_type, dims = nn.Conv1d, 1


class Conv2d(ConvLoRA):
    conv_type, dims = nn.Conv2d, 2


class Conv3d(ConvLoRA):
    conv_type, dims = nn.Conv3d, 3
