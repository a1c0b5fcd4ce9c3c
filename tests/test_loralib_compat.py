"""philora.lora against the real loralib 0.1.2: same outputs, same training, same checkpoints, same trainable set;
and the loralib defects that philora fixes."""

from __future__ import annotations

from collections.abc import Callable

import loralib
import pytest
import torch
from torch import nn

from philora import lora

# name -> (constructor arguments, a batch of input); built with the same seed in both libraries
CASES: dict[str, tuple[dict, Callable[[], torch.Tensor]]] = {
    "Linear": ({"in_features": 12, "out_features": 10, "r": 4, "lora_alpha": 8}, lambda: torch.randn(3, 12)),
    "Embedding": (
        {"num_embeddings": 20, "embedding_dim": 8, "r": 4, "lora_alpha": 8},
        lambda: torch.randint(20, (3, 5)),
    ),
    "Conv2d": (
        {"in_channels": 3, "out_channels": 6, "kernel_size": 3, "r": 2, "lora_alpha": 4},
        lambda: torch.randn(2, 3, 7, 7),
    ),
    "MergedLinear": (
        {"in_features": 12, "out_features": 18, "r": 4, "lora_alpha": 8, "enable_lora": [True, False, True]},
        lambda: torch.randn(3, 12),
    ),
}


def pair(name: str, merge_weights: bool = False) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """The same layer from both libraries, same seed and weights, with B made non-zero so LoRA matters."""
    kwargs, make_input = CASES[name]
    torch.manual_seed(0)
    theirs = getattr(loralib, name)(**kwargs, merge_weights=merge_weights)
    torch.manual_seed(0)
    ours = getattr(lora, name)(**kwargs, merge_weights=merge_weights)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), f"{name}.{key} initialised differently"
    with torch.no_grad():
        torch.manual_seed(1)
        theirs.lora_B.normal_()
        ours.lora_B.copy_(theirs.lora_B)
    torch.manual_seed(2)
    return theirs, ours, make_input()


def assert_same(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if name == "MergedLinear":  # loralib multiplies B@A first, then x: the same sum in a different order
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_outputs_before_and_after_training(name: str) -> None:
    theirs, ours, x = pair(name)
    assert_same(theirs(x), ours(x), name)
    loralib.mark_only_lora_as_trainable(theirs)
    lora.mark_only_lora_as_trainable(ours)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        for module, opt in ((theirs, opt_theirs), (ours, opt_ours)):
            opt.zero_grad()
            module(x).float().pow(2).mean().backward()
            opt.step()
    assert_same(theirs(x), ours(x), name)
    for key, value in loralib.lora_state_dict(theirs).items():
        assert_same(value, lora.lora_state_dict(ours)[key], name)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_state_dicts_cross_load_and_match(name: str, bias: str) -> None:
    theirs, ours, x = pair(name)
    theirs_sd, ours_sd = loralib.lora_state_dict(theirs, bias), lora.lora_state_dict(ours, bias)
    assert sorted(theirs_sd) == sorted(ours_sd)
    assert all(torch.equal(theirs_sd[k], ours_sd[k]) for k in theirs_sd)
    kwargs, _ = CASES[name]
    fresh_ours = getattr(lora, name)(**kwargs)
    assert not fresh_ours.load_state_dict(theirs.state_dict(), strict=True).missing_keys
    assert_same(fresh_ours(x), theirs(x), name)
    fresh_theirs = getattr(loralib, name)(**kwargs, merge_weights=False)
    fresh_theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_same(fresh_theirs(x), ours(x), name)
    # A LoRA-only checkpoint goes onto a model that has the base weights, with strict=False.
    partial = getattr(lora, name)(**kwargs)
    partial.load_state_dict(ours.state_dict())
    with torch.no_grad():
        partial.lora_A.zero_()
    result = partial.load_state_dict(theirs_sd, strict=False)
    assert not result.unexpected_keys
    assert_same(partial(x), theirs(x), name)


class Net(nn.Module):
    def __init__(self, lib: object) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = lib.Embedding(20, 12, r=2)
        self.qkv = lib.MergedLinear(12, 36, r=2, enable_lora=[True, False, True])
        self.proj = lib.Linear(36, 12, r=2, bias=True)
        self.plain = nn.Linear(12, 12)
        self.norm = nn.LayerNorm(12)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_mark_only_lora_as_trainable_same_parameters(bias: str) -> None:
    theirs, ours = Net(loralib), Net(lora)
    loralib.mark_only_lora_as_trainable(theirs, bias)
    lora.mark_only_lora_as_trainable(ours, bias)

    def trainable(m: nn.Module) -> list[str]:
        return sorted(n for n, p in m.named_parameters() if p.requires_grad)

    assert trainable(ours) == trainable(theirs)
    assert sorted(lora.lora_state_dict(ours, bias)) == sorted(loralib.lora_state_dict(theirs, bias))


@pytest.mark.parametrize(("cls", "shape"), [(lora.Conv1d, (2, 4, 9)), (lora.Conv3d, (2, 4, 5, 5, 5))])
def test_conv1d_and_conv3d_work_with_groups(cls: type, shape: tuple) -> None:
    layer = cls(4, 6, 3, r=2, lora_alpha=4, groups=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(shape)
    assert layer.delta_weight().shape == layer.conv.weight.shape
    unmerged = layer(x)
    base = layer.conv(x)
    assert not torch.allclose(unmerged, base)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.conv(x), base, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception):  # noqa: B017 - loralib's own classes cannot run these at all
        getattr(loralib, cls.__name__)(4, 6, 3, r=2, groups=2)(x)


def test_merged_linear_with_unequal_gqa_slices() -> None:
    # Phi-4-mini's qkv in miniature: q 32 | k 8 | v 8, LoRA on q and v only
    layer = lora.MergedLinear(16, 48, r=2, lora_alpha=4, enable_lora=[True, False, True], slices=[32, 8, 8])
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (40, 2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    out = layer(x)
    assert torch.equal(out[:, 32:40], base[:, 32:40])  # the k slice is exactly untouched
    assert not torch.allclose(out[:, :32], base[:, :32]) and not torch.allclose(out[:, 40:], base[:, 40:])
    delta = layer.delta_weight()
    assert torch.equal(delta[32:40], torch.zeros(8, 16))
    layer.merge()
    torch.testing.assert_close(layer(x), out, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):
        loralib.MergedLinear(16, 48, r=2, enable_lora=[True, False, True, False, True])  # 48 % 5: loralib refuses
    with pytest.raises(ValueError, match="give the slice sizes"):
        lora.MergedLinear(16, 48, r=2, enable_lora=[True, False, True, False, True])


def test_merged_linear_with_every_slice_disabled() -> None:
    layer = lora.MergedLinear(8, 12, r=2, enable_lora=[False, False, False])
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert not lora.lora_state_dict(layer)
    broken = loralib.MergedLinear(8, 12, r=2, enable_lora=[False, False, False])
    with pytest.raises(AttributeError):
        broken(x)  # loralib's forward needs lora_A, which it never made


@pytest.mark.parametrize("name", ["Linear", "MergedLinear", "Embedding", "Conv2d"])
def test_loading_while_merged_keeps_the_base_weight(name: str) -> None:
    kwargs, make_input = CASES[name]
    torch.manual_seed(0)
    layer = getattr(lora, name)(**kwargs)
    base = {k: v.clone() for k, v in layer.state_dict().items()}
    base_weight = layer._base_weight().detach().clone()
    other = {k: torch.randn_like(v) for k, v in lora.lora_state_dict(layer).items()}
    with torch.no_grad():
        layer.lora_B.normal_()
    x = make_input()
    layer.merge()
    layer.load_state_dict(other, strict=False)  # a new adapter while merged
    assert layer.merged
    expected = getattr(lora, name)(**kwargs)
    expected.load_state_dict({**base, **other})
    torch.testing.assert_close(layer(x), expected(x), rtol=1e-4, atol=1e-4)
    layer.unmerge()
    torch.testing.assert_close(layer._base_weight(), base_weight, rtol=1e-5, atol=1e-5)
    # loralib keeps the stale update in its weight: unmerging after the load leaves the base corrupted
    torch.manual_seed(0)
    theirs = getattr(loralib, name)(**kwargs)
    with torch.no_grad():
        theirs.lora_B.normal_()
    theirs.eval()
    theirs.load_state_dict(other, strict=False)
    theirs.train()
    weight = theirs.conv.weight if name == "Conv2d" else theirs.weight
    assert not torch.allclose(weight, base_weight, rtol=1e-5, atol=1e-5)


def test_merging_is_explicit_unless_merge_weights() -> None:
    layer = lora.Linear(6, 6, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    weight = layer.weight.detach().clone()
    layer.eval()
    assert not layer.merged and torch.equal(layer.weight, weight)
    layer.merge()
    assert layer.merged and not torch.equal(layer.weight, weight)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, weight)
    compatible = lora.Linear(6, 6, r=2, merge_weights=True)
    compatible.eval()
    assert compatible.merged
    compatible.train()
    assert not compatible.merged
