"""Linear4bit: outputs and input gradients of an nn.Linear over the dequantized weight, without keeping it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlorakit.core.errors import QuantizationError
from qlorakit.quant import linear as linear_mod
from qlorakit.quant.blockwise import dequantize_4bit
from qlorakit.quant.linear import Linear4bit, default_compute_dtype
from qlorakit.quant.state import state_from_tensors

# same arithmetic as nn.Linear up to the matmul's summation order (one bf16 ulp at most)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-8, atol=1e-3)}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # several row chunks (forward) and column chunks (backward) even for the small test layers
    monkeypatch.setattr(linear_mod, "CHUNK_ELEMENTS", 4096)


def _layers(
    out_f: int, in_f: int, bias: bool, dtype: torch.dtype, seed: int = 0, **kw
) -> tuple[Linear4bit, nn.Linear]:
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    q = Linear4bit.from_linear(base, compute_dtype=dtype, **kw)
    ref = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize(torch.float32).to(dtype))
        ref.weight.requires_grad_(False)
        if bias:
            ref.bias.copy_(base.bias.to(dtype))
            ref.bias.requires_grad_(False)
    return q, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(24,), (3, 8)])
@pytest.mark.parametrize(("out_f", "in_f", "blocksize"), [(200, 192, 64), (72, 100, 64), (130, 256, 128)])
def test_matches_nn_linear_on_dequantized_weight(
    dtype: torch.dtype, bias: bool, lead: tuple[int, ...], out_f: int, in_f: int, blocksize: int
) -> None:
    q, ref = _layers(out_f, in_f, bias, dtype, blocksize=blocksize)
    x = torch.randn(*lead, in_f, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = q(x), ref(x_ref)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[dtype])
    assert all(b.grad is None for b in q.buffers())
    assert not any(p.requires_grad for p in q.parameters())


def test_fp32_input_with_bf16_compute_returns_fp32() -> None:
    q, ref = _layers(64, 128, True, torch.bfloat16)
    x = torch.randn(5, 128, requires_grad=True)
    y = q(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref(x.to(torch.bfloat16)).float(), **TOL[torch.bfloat16])
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_unfrozen_bias_gets_its_gradient() -> None:
    q, ref = _layers(48, 64, True, torch.float32)
    q.bias.requires_grad_(True)
    ref.bias.requires_grad_(True)
    x = torch.randn(2, 7, 64)
    g = torch.randn(2, 7, 48)
    q(x).backward(g)
    ref(x).backward(g)
    torch.testing.assert_close(q.bias.grad, ref.bias.grad)


def _saved_tensors(fn) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def _has_dense_weight(saved: list[torch.Tensor], out_f: int, in_f: int) -> bool:
    return any(t.is_floating_point() and t.numel() >= out_f * in_f for t in saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_weight_is_not_saved_for_backward(dtype: torch.dtype) -> None:
    q, ref = _layers(96, 128, True, dtype)
    x = torch.randn(4, 128, dtype=dtype, requires_grad=True)
    # the check can fail: nn.Linear saves its [out, in] weight
    assert _has_dense_weight(_saved_tensors(lambda: ref(x)), 96, 128)
    saved = _saved_tensors(lambda: q(x))
    assert saved and not _has_dense_weight(saved, 96, 128)
    assert all(t.dtype == torch.uint8 for t in saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_grad_and_inference_mode_give_the_same_output(dtype: torch.dtype) -> None:
    q, _ = _layers(80, 64, True, dtype)
    x = torch.randn(3, 9, 64, dtype=dtype)
    train = q(x.clone().requires_grad_(True)).detach()
    with torch.no_grad():
        assert torch.equal(q(x), train)
    with torch.inference_mode():
        assert torch.equal(q(x), train)


def test_autocast_computes_like_nn_linear() -> None:
    q, ref = _layers(64, 128, True, torch.float32)
    x = torch.randn(6, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = q(x), ref(x_ref)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, **TOL[torch.bfloat16])
    y.float().sum().backward()
    y_ref.float().sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[torch.bfloat16])


def test_non_reentrant_gradient_checkpointing() -> None:
    q, _ = _layers(64, 128, True, torch.float32)
    x = torch.randn(2, 5, 128, requires_grad=True)
    x_ck = x.detach().clone().requires_grad_(True)
    (q(x) ** 2).sum().backward()
    (checkpoint(q, x_ck, use_reentrant=False) ** 2).sum().backward()
    torch.testing.assert_close(x_ck.grad, x.grad, rtol=0, atol=0)


def test_to_dtype_keeps_the_quantization_state_exact() -> None:
    q, _ = _layers(64, 128, True, torch.float32, double_quant=False)
    x = torch.randn(3, 128)
    before = {name: b.clone() for name, b in q.named_buffers()}
    y = q(x)
    q.to(torch.bfloat16)
    q.half()
    for name, b in q.named_buffers():
        assert b.dtype == before[name].dtype and torch.equal(b, before[name]), name
    assert q.bias.dtype == torch.float16
    assert q.compute_dtype == torch.float32
    torch.testing.assert_close(q(x), y, rtol=1e-3, atol=1e-3)  # only the bias was rounded


def test_to_device_moves_every_buffer() -> None:
    q, _ = _layers(64, 128, True, torch.float32)
    q.to("meta")
    assert all(t.device.type == "meta" for t in [*q.buffers(), *q.parameters()])
    state = q.quant_state
    assert state.absmax.device.type == "meta" and state.nested.absmax.device.type == "meta"
    assert state.code.device.type == "meta"


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip(double_quant: bool, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    q, _ = _layers(40, 64, True, torch.float32, seed=1, double_quant=double_quant)
    other, _ = _layers(40, 64, True, torch.float32, seed=2, double_quant=double_quant)
    x = torch.randn(4, 64)
    assert not torch.equal(other(x), q(x))
    save_file(q.state_dict(), tmp_path / "layer.safetensors")
    other.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert torch.equal(other(x), q(x))
    assert torch.equal(other.dequantize(), q.dequantize())
    assert set(q.state_dict()) == {"weight", "absmax", "quant_map", "bias"} | (
        {"nested_absmax", "nested_quant_map", "nested_offset"} if double_quant else set()
    )


def test_dequantize_and_state_agree_with_blockwise() -> None:
    torch.manual_seed(0)
    base = nn.Linear(128, 32).to(torch.bfloat16)
    q = Linear4bit.from_linear(base, blocksize=32, quant_type="fp4", compute_dtype=torch.float32)
    state = q.quant_state
    assert (state.blocksize, state.quant_type, state.dtype, tuple(state.shape)) == (
        32,
        "fp4",
        torch.bfloat16,
        (32, 128),
    )
    assert (q.in_features, q.out_features) == (128, 32)
    w = q.dequantize()
    assert w.dtype == torch.bfloat16 and torch.equal(w, dequantize_4bit(q.packed, state))
    assert (w.float() - base.weight.float()).abs().max() < base.weight.abs().max() / 2


def test_matches_bitsandbytes_linear4bit() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    weight = torch.randn(96, 192) * 0.05
    bias = torch.randn(96)
    layer = bnb.nn.Linear4bit(192, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer.bias = nn.Parameter(bias, requires_grad=False)
    layer = layer.to("cpu")  # quantizes
    tensors = {k: v for k, v in layer.state_dict().items() if k != "bias"}
    packed, state = state_from_tensors("", tensors, source="bnb.nn.Linear4bit")
    ours = Linear4bit(packed, state, bias, compute_dtype=torch.float32)
    x = torch.randn(2, 5, 192)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), layer(x), rtol=1e-5, atol=1e-5)
    # and our own quantization of the same weight gives the same layer
    base = nn.Linear(192, 96)
    with torch.no_grad():
        base.weight.copy_(weight)
        base.bias.copy_(bias)
    requantized = Linear4bit.from_linear(base, compute_dtype=torch.float32)
    assert torch.equal(requantized.weight, layer.weight.data.reshape(-1, 1))
    assert torch.equal(requantized.absmax, ours.absmax)
    with torch.no_grad():
        assert torch.equal(requantized(x), ours(x))


def test_bad_arguments_raise_quantization_errors() -> None:
    q, _ = _layers(16, 64, False, torch.float32)
    with pytest.raises(QuantizationError, match=r"expects inputs \[\.\.\., 64\]"):
        q(torch.randn(2, 63))
    with pytest.raises(QuantizationError, match="compute_dtype"):
        Linear4bit(q.weight, q.quant_state, compute_dtype=torch.float64)
    with pytest.warns(UserWarning, match="float16"):
        Linear4bit(q.weight, q.quant_state, compute_dtype=torch.float16)
    with pytest.raises(QuantizationError, match="bias must have shape"):
        Linear4bit(q.weight, q.quant_state, bias=torch.zeros(3))
    with pytest.raises(QuantizationError, match="packed weight must be uint8"):
        Linear4bit(q.weight[:-1], q.quant_state)


def test_default_compute_dtype_follows_native_bf16_instructions(monkeypatch):
    from pathlib import Path

    from qlorakit.quant.linear import cpu_has_native_bf16

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("needs /proc/cpuinfo")
    monkeypatch.delenv("QLORAKIT_CPU_BF16", raising=False)
    cpu_has_native_bf16.cache_clear()
    try:
        flags = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "").split()
        native = "avx512_bf16" in flags or "amx_bf16" in flags
        assert default_compute_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
        assert default_compute_dtype("meta") == torch.float32
    finally:
        cpu_has_native_bf16.cache_clear()  # later tests see this process's own environment again


@pytest.mark.parametrize(("value", "expected"), [("1", torch.bfloat16), ("0", torch.float32)])
def test_cpu_bf16_override_decides_what_auto_resolves_to(monkeypatch, value, expected):
    from qlorakit.quant.linear import cpu_has_native_bf16

    monkeypatch.setenv("QLORAKIT_CPU_BF16", value)
    cpu_has_native_bf16.cache_clear()
    try:
        assert default_compute_dtype("cpu") == expected
        monkeypatch.setenv("QLORAKIT_CPU_BF16", "maybe")
        cpu_has_native_bf16.cache_clear()
        with pytest.raises(QuantizationError, match="QLORAKIT_CPU_BF16='maybe'.*use 1.*or 0"):
            cpu_has_native_bf16()
    finally:
        monkeypatch.undo()
        cpu_has_native_bf16.cache_clear()
