"""The training step's fast path gives the numbers of the plain one: the fused LoRA branch (lora/fused.py), the
fused RMSNorm (model/rms_norm.py), Phi-3's rotary embedding (model/rotary.py), flat packed rows with per-sample
attention (model/packed_attention.py) and the chunked head, against peft's and transformers' own modules on padded
rows with a masked attention, step by step on a tiny Phi-3; and each piece against its reference in value and
gradients."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import read_jsonl, tiny_config

from philora.config import load_config
from philora.lora import fused
from philora.model import cpu_matmul, packed_attention, rms_norm, rotary
from philora.preflight import memory
from philora.train import run as train_run


def losses_of(tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], name: str, *extra: str) -> list[float]:
    out = tmp_path / name
    settings = [f"training_config.output_dir={out}", "training_config.logging_steps=1",
                "training_config.max_steps=6", "peft_config.lora_dropout=0", *extra]  # fmt: skip
    config = load_config(str(tiny_config(tmp_path, tiny_phi3, tiny_data, predict_with_generate=False)), settings)
    train_run.train(config)
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def test_fast_path_losses_equal_the_plain_path_step_by_step(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rotations: list[int] = []
    frozen: list[int] = []
    attended: list[int] = []
    real = rotary.RotaryQKV.apply
    real_frozen = cpu_matmul.FrozenLinear.apply
    real_attention = packed_attention.CausalAttention.apply
    with monkeypatch.context() as m:
        m.setattr(rotary.RotaryQKV, "apply", lambda *a: rotations.append(1) or real(*a))
        m.setattr(cpu_matmul.FrozenLinear, "apply", lambda *a: frozen.append(1) or real_frozen(*a))
        m.setattr(packed_attention.CausalAttention, "apply", lambda *a: attended.append(1) or real_attention(*a))
        fast = losses_of(tmp_path, tiny_phi3, tiny_data, "fast", "model.dtype=float32")
    assert rotations  # the fast path rotated through RotaryQKV
    assert bool(frozen) == cpu_matmul.onednn_available()  # and multiplied by the frozen weights through oneDNN
    assert attended  # and attended by matmuls per sample, as fp32 on a CPU does
    with monkeypatch.context() as m:
        m.setattr(fused, "install", lambda model: 0)  # peft's own LoRA modules
        m.setattr(rms_norm, "install", lambda model: 0)  # transformers' RMSNorm
        m.setattr(rotary, "install", lambda model: 0)  # and attention forward
        # eager attention: padded rows, the block-diagonal mask transformers builds from the positions
        plain = losses_of(tmp_path, tiny_phi3, tiny_data, "plain", "model.dtype=float32",
                          "model.attn_implementation=eager")  # fmt: skip
    assert len(fast) == 6
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=1e-5, atol=0)


@pytest.mark.parametrize("by_matmul", [True, False], ids=["matmul-attention", "flash-attention"])
def test_fast_path_in_bf16_follows_the_plain_path_within_bf16(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, by_matmul: bool
) -> None:
    bf16 = ("model.dtype=bfloat16",)  # bf16 weights (autocast cannot be switched on twice in one process)
    monkeypatch.setenv("PHILORA_CPU_BF16", "1")
    with monkeypatch.context() as m:  # either attention path, whatever this CPU would choose
        m.setattr(packed_attention, "matmul_attention", lambda dtype, device_type: by_matmul)
        fast = losses_of(tmp_path, tiny_phi3, tiny_data, "fast", *bf16)
    with monkeypatch.context() as m:
        m.setattr(fused, "install", lambda model: 0)
        m.setattr(rms_norm, "install", lambda model: 0)
        m.setattr(rotary, "install", lambda model: 0)
        plain = losses_of(tmp_path, tiny_phi3, tiny_data, "plain", *bf16, "model.attn_implementation=eager")
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=2e-2, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_fast_path_follows_peft_on_a_quantized_base_within_bf16(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, bits: int
) -> None:
    pytest.importorskip("bitsandbytes")
    qlora = (f"model.quantization={bits}bit", "model.dtype=bfloat16")
    trained: list[str] = []  # the base layers of the LoRA layers that went through the fused branch in training
    real = fused.fused_forward

    def recorded(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.training and not x.is_meta:  # the memory estimate's meta pass runs an unquantised copy first
            trained.append(type(self.base_layer).__name__)
        return real(self, x)

    with monkeypatch.context() as m:
        m.setattr(fused, "fused_forward", recorded)
        fast = losses_of(tmp_path, tiny_phi3, tiny_data, "fast", *qlora)
    assert trained and set(trained) == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    with monkeypatch.context() as m:
        m.setattr(fused, "install", lambda model: 0)  # peft's own bitsandbytes LoRA layers
        plain = losses_of(tmp_path, tiny_phi3, tiny_data, "plain", *qlora)
    assert len(fast) == 6
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=2e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_equals_peft_in_value_and_gradients(dtype: torch.dtype) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32, bias=False))
    plain = get_peft_model(base.to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    for name, param in plain.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # B starts at zero; make the branch count
    quick = copy.deepcopy(plain)
    assert fused.install(quick) == 2
    x = torch.randn(3, 5, 64, dtype=dtype)
    grad = torch.randn(3, 5, 32)
    results = []
    for model in (plain, quick):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = model(inputs)
        y.float().backward(grad)
        results.append((y.float(), inputs.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (y1, dx1, g1), (y2, dx2, g2) = results
    tolerance = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y2, y1, **tolerance)
    torch.testing.assert_close(dx2, dx1, **tolerance)
    assert g1.keys() == g2.keys() and len(g1) == 4
    for name in g1:
        assert g2[name].dtype == torch.float32  # the adapter's own dtype, as peft keeps it
        torch.testing.assert_close(g2[name], g1[name], **tolerance)


@pytest.mark.parametrize("rotated", [1.0, 0.5], ids=["rotary", "partial-rotary"])
def test_rotary_attention_is_transformers_phi3_attention_with_exact_gradients(rotated: float) -> None:
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3RotaryEmbedding

    torch.manual_seed(0)
    config = Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
                        partial_rotary_factor=rotated)  # fmt: skip
    config._attn_implementation = "sdpa"
    plain = Phi3Attention(config, 0).double().train()
    quick = copy.deepcopy(plain)
    assert rotary.install(quick) == 1
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    positions = torch.arange(7).expand(2, 7)
    cos, sin = Phi3RotaryEmbedding(config)(x, positions)
    assert cos.shape[-1] == 16 * rotated  # half the head's dimensions rotated, half passed through
    results = []
    for module in (plain, quick):
        inputs = x.clone().requires_grad_()
        y, _ = module(inputs, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions)
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
        results.append((y, inputs.grad, module.qkv_proj.weight.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    qkv = torch.randn(2, 7, 8 * 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: rotary.RotaryQKV.apply(t, cos, sin, 4, 2), (qkv,))
    quick.eval()  # evaluation runs transformers' own forward
    with torch.no_grad():
        y, _ = quick(x, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions)
    torch.testing.assert_close(y, plain.eval()(x, position_embeddings=(cos, sin), attention_mask=None)[0])


@pytest.mark.parametrize("in_place", [False, True])
def test_fused_lora_with_dropout_is_the_formula_with_its_mask_and_has_exact_gradients(in_place: bool) -> None:
    p = 0.3
    hidden = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in ((7, 96), (7, 64), (4, 64),
                                                                                          (96, 4))]  # fmt: skip

    def branch(base: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(5)  # the same mask on every call
        # in place, into a fresh tensor as a base layer's output is (the leaf itself cannot be written)
        return fused.lora_delta(base * 1 if in_place else base, x, a, b, 2.0, p, in_place)

    assert torch.autograd.gradcheck(branch, hidden)
    base, x, a, b = hidden
    torch.manual_seed(5)
    dropped, drawn = fused.draw_dropout(x.shape, p, x.device)
    assert drawn == p and dropped.dtype == torch.int64 and 0 < len(dropped) < x.numel()  # positions, on the CPU
    keep = torch.ones(x.numel(), dtype=torch.bool)
    keep[dropped] = False
    expected = base + 2.0 * ((x * keep.view(x.shape) / (1 - p)) @ a.T) @ b.T
    torch.testing.assert_close(branch(*hidden), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("draws", [None, 3], ids=["as-drawn", "drawn-on-three-at-a-time"])
def test_dropout_positions_are_independent_drops_with_the_asked_probability_and_follow_the_seed(
    monkeypatch: pytest.MonkeyPatch, draws: int | None
) -> None:
    if draws:  # the rare case of gaps that fall short of the end, made the rule: drawn on from the last position
        monkeypatch.setattr(fused, "gap_draws", lambda expected: draws)
    p, numel = 0.05, 400_000 if draws else 4_000_000
    torch.manual_seed(0)
    dropped = fused.dropped_positions(numel, p, torch.device("cpu"))
    assert dropped.dtype == torch.int64 and int(dropped[0]) >= 0 and int(dropped[-1]) < numel
    assert bool((dropped.diff() > 0).all())  # ascending, no position twice
    sigma = (p * (1 - p) / numel) ** 0.5
    assert abs(len(dropped) / numel - p) < 5 * sigma
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[dropped] = True
    for lane in range(4):  # every position alike
        assert abs(mask[lane::4].float().mean().item() - p) < 5 * 2 * sigma
    # independence: the element after a dropped one is dropped with probability p too, as are runs of three
    after = mask[1:][mask[:-1]].float()
    assert abs(after.mean().item() - p) < 5 * (p * (1 - p) / len(after)) ** 0.5
    runs = (mask[:-2] & mask[1:-1] & mask[2:]).float().mean().item()
    assert abs(runs - p**3) < 5 * (p**3 / numel) ** 0.5
    torch.manual_seed(0)
    assert torch.equal(fused.dropped_positions(numel, p, torch.device("cpu")), dropped)
    if not draws:  # the estimate's pass: as many as expected, held in a buffer of the size drawn
        meta = fused.dropped_positions(numel, p, torch.device("meta"))
        assert meta.shape == (round(numel * p),)
        assert meta.untyped_storage().nbytes() == dropped.untyped_storage().nbytes() == 8 * fused.gap_draws(numel * p)


def test_dropout_masks_on_other_devices_drop_with_the_asked_probability_in_every_lane() -> None:
    torch.manual_seed(0)
    dropped, drawn = fused.dropped_mask(torch.Size((2000, 1000)), 0.05, torch.device("cpu"))
    assert drawn == 3277 / 65536
    dropped = dropped.flatten()
    # each of the four 16-bit lanes of a 64-bit draw drops at the same rate (a sign bit left at zero would not)
    for lane in range(4):
        assert abs(dropped[lane::4].float().mean().item() - drawn) < 2e-3
    x = torch.ones(2000, 1000)
    assert torch.equal(fused.zero_dropped_(x, dropped.view(x.shape)).flatten() == 0, dropped)


@pytest.mark.parametrize("mixed", [False, True], ids=["sdpa", "matmul-and-sdpa"])
def test_packed_attention_equals_masked_sdpa_and_falls_back_without_boundaries(
    mixed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[int] = []
    if mixed:  # samples up to MATMUL_LONGEST tokens by matmuls, longer ones by SDPA, in one row
        monkeypatch.setattr(packed_attention, "matmul_attention", lambda dtype, device_type: True)
        monkeypatch.setattr(packed_attention, "MATMUL_LONGEST", 6)
        real = packed_attention.CausalAttention.apply
        monkeypatch.setattr(
            packed_attention.CausalAttention, "apply", lambda *a: taken.append(a[0].shape[2]) or real(*a)
        )
    torch.manual_seed(0)
    lengths = [5, 9, 1, 7]
    total = sum(lengths)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    query = torch.randn(1, 4, total, 8, dtype=torch.float64, requires_grad=True)
    key = torch.randn(1, 2, total, 8, dtype=torch.float64, requires_grad=True)
    value = torch.randn(1, 2, total, 8, dtype=torch.float64, requires_grad=True)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    varlen = packed_attention.varlen_arguments(positions)
    assert varlen["cu_seq_lens_q"].tolist() == [0, 5, 14, 15, 22] and varlen["max_length_q"] == 9
    assert packed_attention.varlen_arguments(positions[:, 2:]) == {}  # not whole samples: the mask decides
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (sample[:, None] == sample[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()

    def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)

    got, _ = packed_attention.packed_sdpa(module, query, key, value, None, scaling=0.3, **varlen)
    assert taken == ([5, 1] if mixed else [])
    expected = reference(query, key, value)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (query, key, value), grad)
    expected_grads = torch.autograd.grad(expected, (query, key, value), grad)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    # no boundaries (evaluation batches, generation): transformers' SDPA with the mask it was given
    fallback, _ = packed_attention.packed_sdpa(module, query, key, value, mask[None, None], scaling=0.3)
    torch.testing.assert_close(fallback, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [256, 3], ids=["one-block", "blocks-of-3"])
def test_causal_attention_by_matmuls_has_exact_values_and_gradients(
    block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 7 tokens: one block, or 3 + 3 + 1
    monkeypatch.setattr(packed_attention, "QUERY_BLOCK", {torch.float64: block, torch.bfloat16: block})
    torch.manual_seed(0)
    # (1, 4 heads, 7 tokens, 6) queries as attention gets them: a transposed view; 2 key/value heads
    query = torch.randn(1, 7, 4, 6, dtype=torch.float64).transpose(1, 2).requires_grad_()
    key = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    value = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    attention = packed_attention.CausalAttention.apply
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, 0.3), (query, key, value))
    k, v = key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1)
    expected = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(attention(query, key, value, 0.3), expected, rtol=1e-12, atol=1e-12)
    # in bf16, against fp32 on the same (bf16-rounded) inputs: within bf16's rounding of scores and products
    q16, k16, v16 = (t.detach().to(torch.bfloat16).requires_grad_() for t in (query, key, value))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q16, k16, v16))
    got = attention(q16, k16, v16, 0.3)
    want = F.scaled_dot_product_attention(q32, k32.repeat_interleave(2, 1), v32.repeat_interleave(2, 1),
                                          is_causal=True, scale=0.3)  # fmt: skip
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(want)
    for g16, g32 in zip(torch.autograd.grad(got, (q16, k16, v16), grad.bfloat16()),
                        torch.autograd.grad(want, (q32, k32, v32), grad), strict=True):  # fmt: skip
        torch.testing.assert_close(g16.float(), g32, rtol=3e-2, atol=3e-2)


def test_matmul_attention_for_fp32_on_cpus_and_bf16_on_cpus_with_bf16_arithmetic_but_no_amx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from philora import hardware

    for flags, expected in [({"avx512_bf16"}, True), ({"avx512_bf16", "amx_bf16"}, False), ({"avx2"}, False)]:
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: frozenset(flags))
        monkeypatch.setattr(hardware, "cpu_detects_bf16", lambda flags=flags: bool({"avx512_bf16", "amx_bf16"} & flags))
        assert packed_attention.matmul_attention(torch.bfloat16, "cpu") is expected, flags
        assert packed_attention.matmul_attention(torch.float32, "cpu")
        assert not packed_attention.matmul_attention(torch.float16, "cpu")
        for dtype in (torch.float32, torch.bfloat16):
            assert not packed_attention.matmul_attention(dtype, "cuda")


@pytest.mark.parametrize("name", rms_norm.CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_is_each_listed_norm_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    import importlib

    family = name.removesuffix("RMSNorm").lower()
    module = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)(64, eps=1e-5)
    module = module.to(dtype)
    module.weight.requires_grad_(False)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 64) * 3).to(dtype).requires_grad_()
    grad = torch.randn(3, 5, 64).to(dtype)
    module.train()
    expected = module(x)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    assert rms_norm.install(module) == 1
    got = module(x)
    assert got.grad_fn is not None and "RMSNormFunction" in type(got.grad_fn).__name__
    assert torch.equal(got, expected)
    before = x.detach().clone()
    (got_grad,) = torch.autograd.grad(got, x, grad)
    assert torch.equal(x, before)  # backward leaves the saved input as it was (fp32 once scaled it in place)
    # the same formula in another order: equal to the dtype's last bit
    torch.testing.assert_close(got_grad, expected_grad, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    module.eval()  # evaluation and generation run the module's own forward
    assert "RMSNormFunction" not in type(module(x).grad_fn).__name__
    module.train()
    module.weight.requires_grad_(True)  # a trained weight: the module's own forward, with its weight gradient
    assert "RMSNormFunction" not in type(module(x).grad_fn).__name__


def test_memory_estimate_counts_the_probabilities_matmul_attention_keeps(
    tmp_path: Path, tiny_phi3: Path, tiny_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from philora.preflight import architecture

    config = load_config(str(tiny_config(tmp_path, tiny_phi3, tiny_data)), ["model.attn_implementation=sdpa"])
    batch, length, heads = 2, 64, 4
    counts = {}
    for keeps in (False, True):
        monkeypatch.setattr(memory, "matmul_attention", lambda dtype, device_type, keeps=keeps: keeps)
        arch = architecture.build(config)
        assert arch.model.get_base_model().config.num_attention_heads == heads
        counts[keeps] = memory.saved_for_backward(arch, batch, length, packed=True)
    # a row of 512 tokens as one sample, in blocks of 128 queries in bf16: 128 x (128 + 256 + 384 + 512) per head
    assert packed_attention.kept_probabilities(512, torch.bfloat16) == 128 * 1280 == 512 * 512 * 5 // 8
    assert packed_attention.kept_probabilities(600, torch.bfloat16) == 128 * 1280 + 88 * 88  # and a sample of 88
    # in fp32, blocks of 64: 64 x (64 + 128 + ... + 512)
    assert packed_attention.kept_probabilities(512, torch.float32) == 64 * 64 * 36 == 512 * 512 * 9 // 16
    layers = len(counts[True].per_layer)
    size = arch.dtype.itemsize
    assert counts[True].total - counts[False].total == layers * batch * heads * length * length * size
