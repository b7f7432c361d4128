"""LoRALinear: maths, PEFT-identical init and forward, DoRA, adapters, merging, autograd memory."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from qlorakit.core.errors import ConfigError, ModelError, QuantizationError
from qlorakit.lora.dora import dora_weight_norm
from qlorakit.lora.dropout import draw_seed, keep_mask_reference
from qlorakit.lora.layer import LoRALinear, delta_weight, init_lora_weights, lora_scaling


def _peft_layer(base: nn.Linear, **lora_kwargs):
    """A real PEFT lora.Linear around a copy of `base` (through get_peft_model on a one-layer model)."""
    import copy

    model = nn.Sequential(OrderedDict(proj=copy.deepcopy(base)))
    peft_model = get_peft_model(model, LoraConfig(target_modules=["proj"], **lora_kwargs))
    return peft_model.base_model.model.proj


def _randomise(layer: LoRALinear, peft_layer=None, name: str = "default", seed: int = 0) -> None:
    """Simulate training: random non-zero B (and magnitude); copy the same values into the PEFT layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        b = layer.lora_B[name].weight
        b.copy_(torch.randn(b.shape, generator=g) * 0.2)
        if name in layer.lora_magnitude_vector:
            m = layer.lora_magnitude_vector[name].weight
            m.mul_(1 + 0.3 * torch.rand(m.shape, generator=g))
        if peft_layer is not None:
            peft_layer.lora_A[name].weight.copy_(layer.lora_A[name].weight)
            peft_layer.lora_B[name].weight.copy_(b)
            if name in layer.lora_magnitude_vector:
                peft_layer.lora_magnitude_vector[name].weight.copy_(layer.lora_magnitude_vector[name].weight)


class _SameMaskDropout(nn.Module):
    """Inverted dropout drawing qlorakit's mask (same seed draw from the global generator), so a PEFT layer
    given it sees exactly the masks a LoRALinear draws after the same `torch.manual_seed`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = keep_mask_reference(draw_seed(), x.numel(), self.p).view(x.shape)
        return x * keep / (1 - self.p)


@pytest.fixture
def base():
    torch.manual_seed(0)
    return nn.Linear(24, 40, bias=True)


def test_scaling_and_delta_weight():
    assert lora_scaling(16, 32, False) == 2.0
    assert lora_scaling(16, 32, True) == pytest.approx(8.0)
    with pytest.raises(ConfigError, match="positive"):
        lora_scaling(0, 8, False)
    a, b = torch.randn(4, 6), torch.randn(5, 4)
    torch.testing.assert_close(delta_weight(a, b, 0.5), 0.5 * b @ a)


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_init_matches_peft_draw_for_draw(base, init):
    """With the same global RNG stream, our A is PEFT's A bit for bit; B is zero."""
    torch.manual_seed(123)
    peft_layer = _peft_layer(
        base, r=8, lora_alpha=16, init_lora_weights=True if init == "default" else "gaussian"
    )
    # PEFT first builds nn.Linear(in, r) and nn.Linear(r, out) (each drawing its own init), then re-draws A.
    torch.manual_seed(123)
    nn.Linear(24, 8, bias=False)
    nn.Linear(8, 40, bias=False)
    ours = LoRALinear(base, r=8, alpha=16, init=init)
    assert torch.equal(ours.lora_A["default"].weight, peft_layer.lora_A["default"].weight)
    assert torch.count_nonzero(ours.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(24)  # kaiming_uniform_(a=sqrt(5)) on fan_in 24
    if init == "default":
        assert ours.lora_A["default"].weight.abs().max() <= bound


def test_seed_is_independent_of_global_rng():
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    a1, _ = init_lora_weights(8, 32, 16, init="default", seed=7)
    assert torch.equal(torch.random.get_rng_state(), state), "a seeded init must not consume the global RNG"
    torch.manual_seed(999)
    a2, _ = init_lora_weights(8, 32, 16, init="default", seed=7)
    a3, _ = init_lora_weights(8, 32, 16, init="default", seed=8)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, a3)
    with pytest.raises(ConfigError, match="init"):
        init_lora_weights(8, 32, 16, init="pissa", seed=1)


def test_starts_as_noop_and_matches_formula(base):
    layer = LoRALinear(base, r=4, alpha=8, seed=0)
    x = torch.randn(3, 5, 24)
    assert torch.equal(layer(x), base(x))
    _randomise(layer)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = base(x) + 2.0 * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert layer.in_features == 24 and layer.out_features == 40


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_grads_match_peft(base, use_dora, use_rslora):
    """Same outputs and gradients as PEFT, in train mode with dropout (same masks) and in eval mode."""
    peft_layer = _peft_layer(
        base, r=4, lora_alpha=8, lora_dropout=0.3, use_dora=use_dora, use_rslora=use_rslora
    )
    peft_layer.lora_dropout["default"] = _SameMaskDropout(0.3)
    ours = LoRALinear(base, r=4, alpha=8, dropout=0.3, use_dora=use_dora, use_rslora=use_rslora, seed=3)
    if use_dora:  # magnitude initialised like PEFT's: the row norms of the base weight
        torch.testing.assert_close(
            ours.lora_magnitude_vector["default"].weight, peft_layer.lora_magnitude_vector["default"].weight
        )
    _randomise(ours, peft_layer)
    x = torch.randn(2, 7, 24)
    for training in (True, False):
        ours.train(training)
        peft_layer.train(training)
        torch.manual_seed(5)
        y_ours = ours(x)
        torch.manual_seed(5)
        y_peft = peft_layer(x)
        torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-6)
    ours.train()
    peft_layer.train()
    g = torch.randn(2, 7, 40)
    torch.manual_seed(6)
    (ours(x) * g).sum().backward()
    torch.manual_seed(6)
    (peft_layer(x) * g).sum().backward()
    params = ["lora_A", "lora_B"] + (["lora_magnitude_vector"] if use_dora else [])
    for p in params:
        torch.testing.assert_close(
            getattr(ours, p)["default"].weight.grad,
            getattr(peft_layer, p)["default"].weight.grad,
            rtol=1e-4,
            atol=1e-6,
        )
    assert ours.base_layer.weight.grad is None, "the base stays frozen"


def test_dora_norm_without_forming_ba():
    w, a, b = torch.randn(30, 20), torch.randn(6, 20), torch.randn(30, 6)
    torch.testing.assert_close(dora_weight_norm(w, a, b, 0.7), torch.linalg.norm(w + 0.7 * b @ a, dim=1))


def test_only_lora_params_get_gradients(base):
    layer = LoRALinear(base, r=4, alpha=8, use_dora=True, seed=0)
    base.requires_grad_(False)
    layer(torch.randn(4, 24)).square().sum().backward()
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == {
        "lora_A.default.weight",
        "lora_B.default.weight",
        "lora_magnitude_vector.default.weight",
    }


def test_multiple_adapters(base):
    layer = LoRALinear(base, r=4, alpha=8, seed=0)
    layer.add_adapter("other", r=2, alpha=2, seed=1)
    _randomise(layer, name="default", seed=1)
    _randomise(layer, name="other", seed=2)
    x = torch.randn(6, 24)
    y_default = layer(x)
    layer.set_adapter("other")
    y_other = layer(x)
    assert layer.active_adapter == "other"
    assert not torch.allclose(y_default, y_other)
    layer.disable_adapters = True
    assert torch.equal(layer(x), base(x)), "disabled adapters give exactly the base output"
    layer.disable_adapters = False
    torch.testing.assert_close(layer(x), y_other)
    layer.delete_adapter("other")
    assert layer.active_adapter == "default" and "other" not in layer.lora_A and "other" not in layer.scaling
    torch.testing.assert_close(layer(x), y_default)
    with pytest.raises(ConfigError, match="no adapter named 'nope'"):
        layer.set_adapter("nope")
    with pytest.raises(ConfigError, match="already exists"):
        layer.add_adapter("default", r=2, alpha=2)
    with pytest.raises(ModelError, match="only adapter"):
        layer.delete_adapter("default")


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge(base, use_dora):
    layer = LoRALinear(base, r=4, alpha=8, use_dora=use_dora, seed=0)
    _randomise(layer)
    x = torch.randn(5, 24)
    original = base.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged_adapters == ["default"]
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base(x), y, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(base.weight, original, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        layer.merge()
        layer.disable_adapters = True  # disabling a merged layer unmerges it: exactly-base semantics
        assert not layer.merged_adapters
        torch.testing.assert_close(layer(x), x @ original.T + base.bias, rtol=1e-5, atol=1e-5)


def test_delta_weight_method_matches_function(base):
    layer = LoRALinear(base, r=4, alpha=8, seed=0)
    _randomise(layer)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer.delta_weight(), delta_weight(a, b, 2.0))


def test_rejects_non_linear_base():
    with pytest.raises(ModelError, match="Embedding"):
        LoRALinear(nn.Embedding(10, 4), r=2, alpha=2)


def test_half_precision_input_keeps_fp32_adapter():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8, seed=0)
    _randomise(layer)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    y.float().sum().backward()
    assert layer.lora_B["default"].weight.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LoRALinear(nn.Linear(16, 8), r=2, alpha=2)(torch.randn(3, 16)).dtype == torch.bfloat16


def _saved_tensors(fn):
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_backward_keeps_no_dense_lora_matrix(dropout):
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=False).requires_grad_(False)
    layer = LoRALinear(base, r=4, alpha=8, dropout=dropout, seed=0).train()
    x = torch.randn(10, 64)
    _, saved = _saved_tensors(lambda: layer(x))
    dense = [t for t in saved if t.shape == (48, 64)]
    # The only [out, in] tensor autograd may hold is the frozen base weight itself (by reference, no copy).
    assert all(t.data_ptr() == base.weight.data_ptr() for t in dense)
    assert max(t.numel() for t in saved) <= x.numel()
    # Input-sized tensors: x itself (no dropped-out copy); with dropout, a 1-bit keep-mask.
    input_sized = [t for t in saved if t.shape == x.shape]
    assert all(t.data_ptr() == x.data_ptr() for t in input_sized)
    masks = [t for t in saved if t.dtype == torch.uint8]
    assert [t.numel() for t in masks] == ([-(-x.numel() // 8)] if dropout else [])
    assert any(t.shape == (10, 4) for t in saved), "the [tokens, r] intermediate"


def test_4bit_base():
    from qlorakit.quant.linear import Linear4bit

    torch.manual_seed(0)
    dense = nn.Linear(128, 64, bias=True)
    q = Linear4bit.from_linear(dense, compute_dtype=torch.float32)
    layer = LoRALinear(q, r=8, alpha=16, use_dora=True, seed=0)
    w = q.dequantize(torch.float32)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, torch.linalg.norm(w, dim=1))
    x = torch.randn(4, 128, requires_grad=True)
    assert torch.equal(layer(x), q(x)), "a fresh DoRA adapter is a no-op (magnitude = norm, B = 0)"
    _randomise(layer)
    plain = LoRALinear(q, adapter_name="p", r=8, alpha=16, seed=0)
    _randomise(plain, name="p")
    a, b = plain.lora_A["p"].weight, plain.lora_B["p"].weight
    torch.testing.assert_close(plain(x), x @ w.T + q.bias + 2.0 * (x @ a.T) @ b.T, rtol=1e-5, atol=1e-5)
    _, saved = _saved_tensors(lambda: layer.train()(x))
    assert not [t for t in saved if t.shape == (64, 128)], "no dense [out, in] weight kept for backward"
    with pytest.raises(QuantizationError, match="16-bit"):
        plain.merge()
