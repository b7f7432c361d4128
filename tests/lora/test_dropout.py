"""LoRA dropout: the C++ mask equals the plain-torch reference bit for bit, drop rates, masked maths, grads."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from qlorakit.core import native
from qlorakit.lora import dropout as d
from qlorakit.quant import kernels

needs_kernels = pytest.mark.skipif(
    not native.available(d.SOURCE), reason="C++ kernels could not be built here"
)
ISAS = {"avx512": [0, 1, 2], "avx2": [0, 1], "scalar": [0]}.get(kernels.isa(), [0])


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 1000, 131_072 * 3 + 5])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_kernel_mask_equals_reference(isa, n, p):
    seed = d.draw_seed()
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
    assert native.library(d.SOURCE).qlk_dropout_mask(seed, n, d.threshold(p), bits.data_ptr(), isa) == 0
    assert torch.equal(d.unpack_bits(bits, n), d.keep_mask_reference(seed, n, p))


def test_reference_is_splitmix64_of_the_counter():
    """The reference's wrapped int64 arithmetic gives the textbook uint64 SplitMix64 values."""
    seed = 0xDEADBEEF12345678

    def splitmix(z: int) -> int:
        m = (1 << 64) - 1
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & m
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & m
        return z ^ (z >> 31)

    n = 10
    draws = []
    for k in range(1, n // 2 + 1):
        z = splitmix((seed + k * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
        draws += [z & 0xFFFFFFFF, z >> 32]
    p = 0.37
    expected = torch.tensor([v >= round(p * 2**32) for v in draws])
    assert torch.equal(d.keep_mask_reference(seed, n, p), expected)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_drop_rate_and_independence(p):
    n = 1 << 20
    keep = d.unpack_bits(d.keep_bits(d.draw_seed(), n, p), n)
    rate = 1 - keep.float().mean().item()
    assert abs(rate - p) < 6 * math.sqrt(p * (1 - p) / n)  # 6 sigma
    # Neighbouring elements (the two halves of one hash, adjacent hashes) are uncorrelated.
    k = keep.float() - keep.float().mean()
    for lag in (1, 2, 8):
        corr = (k[:-lag] * k[lag:]).mean() / k.var()
        assert abs(corr.item()) < 6 / math.sqrt(n)
    other = d.unpack_bits(d.keep_bits(d.draw_seed(), n, p), n)
    assert not torch.equal(keep, other), "each call draws a new mask"


def test_seed_follows_torch_manual_seed():
    torch.manual_seed(11)
    a = d.keep_bits(d.draw_seed(), 999, 0.2)
    torch.manual_seed(11)
    b = d.keep_bits(d.draw_seed(), 999, 0.2)
    assert torch.equal(a, b)


def test_pack_unpack_roundtrip():
    keep = torch.rand(1001) > 0.5
    bits = d.pack_bits(keep)
    assert bits.dtype == torch.uint8 and bits.numel() == 126
    assert torch.equal(d.unpack_bits(bits, 1001), keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [5, 64, 100, 4099])
def test_apply_keep_matches_torch(dtype, n):
    x = torch.randn(n).to(dtype)
    bits = d.keep_bits(d.draw_seed(), n, 0.4)
    expected = torch.where(d.unpack_bits(bits, n), x, torch.zeros((), dtype=dtype))
    assert torch.equal(d.apply_keep(x, bits), expected)
    y = x.clone()
    out = d.apply_keep(y, bits, inplace=True)
    assert out.data_ptr() == y.data_ptr() and torch.equal(y, expected)


def test_apply_keep_rejects_a_strided_view():
    x = torch.randn(8, 8).t()
    with pytest.raises(ValueError, match="contiguous"):
        d.apply_keep(x, d.keep_bits(1, 64, 0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_project_matches_autograd_with_the_same_mask(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 40, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 40, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 6, dtype=dtype)
    p = 0.25
    torch.manual_seed(7)
    h = d.dropout_project(x, w, p)
    h.backward(g)
    torch.manual_seed(7)
    keep = d.keep_mask_reference(d.draw_seed(), x.numel(), p).view(x.shape)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    h2 = F.linear(x2 * keep / (1 - p), w2)
    h2.backward(g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=1e-1)
    torch.testing.assert_close(h, h2, **tol)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    torch.testing.assert_close(w.grad, w2.grad, **tol)
    assert torch.all(x.grad[~keep] == 0), "dropped inputs get no gradient"


def test_dropout_matches_masked_scaling_and_handles_strided_and_empty_inputs():
    torch.manual_seed(0)
    x = torch.randn(12, 9).t().requires_grad_()  # non-contiguous
    torch.manual_seed(3)
    y = d.dropout(x, 0.5)
    y.backward(torch.ones_like(y))
    torch.manual_seed(3)
    keep = d.keep_mask_reference(d.draw_seed(), x.numel(), 0.5).view(9, 12)
    torch.testing.assert_close(y, x.detach() * keep * 2.0)
    torch.testing.assert_close(x.grad, keep * 2.0)
    empty = torch.randn(0, 4, requires_grad=True)
    out = d.dropout_project(empty, torch.randn(2, 4), 0.1)
    out.sum().backward()
    assert out.shape == (0, 2) and empty.grad.shape == (0, 4)


def test_without_kernels_the_masks_are_the_same():
    """QLORAKIT_NO_KERNELS=1 (or no compiler) uses the reference: identical masks and outputs."""
    code = (
        "import torch; from qlorakit.core import native; from qlorakit.lora import dropout as d;"
        "torch.manual_seed(4); print(native.available(d.SOURCE), d.keep_bits(d.draw_seed(), 1000, 0.3).tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "QLORAKIT_NO_KERNELS": "1"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    available, values = out.stdout.split(" ", 1)
    assert available == "False"
    torch.manual_seed(4)
    assert values.strip() == str(d.keep_bits(d.draw_seed(), 1000, 0.3).tolist())
