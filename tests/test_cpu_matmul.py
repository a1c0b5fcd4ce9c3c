"""fp32 products through oneDNN on x86 CPUs (model.cpu_matmul): fp32 results, gradients, and where they apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from philora.model import cpu_matmul, loss

needs_onednn = pytest.mark.skipif(not cpu_matmul.onednn_available(), reason="this PyTorch has no oneDNN linear here")


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.double() - exact).abs().max() / exact.abs().max())


@needs_onednn
@pytest.mark.parametrize("transposed", [False, True], ids=["weight", "transposed-view"])
def test_onednn_linear_is_an_fp32_product(transposed: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(300, 96)
    weight = torch.randn(96, 200).T if transposed else torch.randn(200, 96)
    bias = torch.randn(200)
    assert cpu_matmul.by_onednn(x)
    exact = x.double() @ weight.double().T + bias.double()
    got = cpu_matmul.linear(x, weight, bias)
    assert got.dtype == torch.float32 and got.shape == (300, 200)
    # fp32's rounding (2^-24 relative per operation), not bf16's (2^-8): the same order as PyTorch's own mm
    assert relative_error(got, exact) < 1e-5
    assert relative_error(F.linear(x, weight, bias), exact) < 1e-5
    out = torch.full((300, 200), float("nan"))
    assert cpu_matmul.linear_into(out, x, weight) is out
    assert relative_error(out, exact - bias.double()) < 1e-5


@needs_onednn
def test_frozen_linear_matches_the_layer_in_value_and_input_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48).requires_grad_(False)
    x = torch.randn(2, 7, 64, requires_grad=True)
    grad = torch.randn(2, 7, 48)
    calls: list[int] = []
    real = cpu_matmul.FrozenLinear.apply
    monkeypatch.setattr(cpu_matmul.FrozenLinear, "apply", lambda *a: calls.append(1) or real(*a))
    y = cpu_matmul.frozen_linear(layer, x)
    assert calls  # through oneDNN
    exact = x.detach().double() @ layer.weight.double().T + layer.bias.double()
    assert y.shape == (2, 7, 48) and relative_error(y, exact) < 1e-5
    y.add_(1)  # the fused LoRA adds its branch into the output in place: allowed, as on a layer's own output
    (dx,) = torch.autograd.grad(y, x, grad)
    assert relative_error(dx, grad.double() @ layer.weight.double()) < 1e-5


def test_frozen_linear_is_the_layer_itself_outside_frozen_fp32_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(cpu_matmul.FrozenLinear, "apply", lambda *a: calls.append(1))
    x = torch.randn(5, 8)
    trained = torch.nn.Linear(8, 4)  # its weight requires a gradient
    bf16 = torch.nn.Linear(8, 4).to(torch.bfloat16).requires_grad_(False)
    for layer, inputs in ((trained, x), (bf16, x.to(torch.bfloat16))):
        assert torch.equal(cpu_matmul.frozen_linear(layer, inputs), layer(inputs))
    assert not calls


@needs_onednn
def test_chunked_head_through_onednn_is_the_fp32_log_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss, "CHUNK", 64)
    used: list[bool] = []
    real = cpu_matmul.by_onednn
    monkeypatch.setattr(cpu_matmul, "by_onednn", lambda x: used.append(real(x)) or used[-1])
    torch.manual_seed(0)
    hidden = torch.randn(150, 32, requires_grad=True)
    weight = torch.randn(500, 32) * 0.3
    targets = torch.randint(0, 500, (150,))
    got = loss.ChunkedTokenLogprobs.apply(hidden, weight, targets)
    (grad,) = torch.autograd.grad(got.sum(), hidden)
    assert used and all(used)  # every product of the head, forward and gradient, went through oneDNN
    exact_hidden = hidden.detach().double().requires_grad_()
    exact = torch.log_softmax(exact_hidden @ weight.double().T, -1).gather(1, targets[:, None]).squeeze(1)
    (exact_grad,) = torch.autograd.grad(exact.sum(), exact_hidden)
    assert relative_error(got, exact) < 1e-5 and relative_error(grad, exact_grad) < 1e-5
