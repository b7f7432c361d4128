"""The NF4 / FP4 code tables and the dynamic 8-bit map, against their definitions and bitsandbytes."""

import pytest
import torch

from qlorakit.core.errors import QuantizationError
from qlorakit.quant import FP4_CODE, NF4_CODE, dynamic_map, get_code
from qlorakit.quant.codes import quantize_bounds


def test_nf4_table_shape_and_structure():
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1]), "NF4 is sorted: index order is value order"
    assert (NF4_CODE < 0).sum() == 7 and (NF4_CODE > 0).sum() == 8


def test_nf4_is_normal_quantiles_up_to_last_ulp():
    # create_normal_map(offset=0.9677083): 8 positive and 7 negative N(0,1) quantiles, normalised
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    values = values / values.abs().max()
    torch.testing.assert_close(NF4_CODE.double(), values, atol=1e-6, rtol=0)


def test_fp4_table_is_sign_magnitude_in_bit_pattern_order():
    assert FP4_CODE.dtype == torch.float32 and FP4_CODE.shape == (16,)
    assert FP4_CODE.abs().max() == 1.0
    # bit 3 is the sign: pattern p + 8 is the negation of pattern p
    assert torch.equal(FP4_CODE[9:], -FP4_CODE[1:8])
    assert FP4_CODE[8].view(torch.int32) == 0, "pattern 8 (-0) is stored as +0.0, as in bitsandbytes"
    # magnitudes: zero, one subnormal (0.0625) and (1 + m/2) * 2**e for e in 1..3, m in {0, 1}; / 12 in fp32
    magnitudes = {0.0, 0.0625} | {(1 + m / 2) * 2.0**e for e in (1, 2, 3) for m in (0, 1)}
    scaled = {round(v * 12, 4) for v in FP4_CODE[:8].tolist()}
    assert scaled == magnitudes
    for v in FP4_CODE[:8].tolist():
        magnitude = round(v * 12, 4)
        assert v == (torch.tensor(magnitude, dtype=torch.float32) / 12).item()
    # bit pattern order (not value order): 0b010 is the largest normal before scaling to 12 (0b011)
    assert FP4_CODE[3] == 1.0 and FP4_CODE[2] * 12 == pytest.approx(8.0)


def test_get_code_returns_tables_and_rejects_unknown():
    assert torch.equal(get_code("nf4"), NF4_CODE)
    assert torch.equal(get_code("fp4"), FP4_CODE)
    for bad in ("int4", "NF4", "", None, 4):
        with pytest.raises(QuantizationError, match="unknown quant_type"):
            get_code(bad)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_structure(signed):
    code = dynamic_map(signed)
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert torch.all(code[1:] >= code[:-1])
    assert code[-1] == 1.0 and (code == 0).any()
    if signed:
        assert code[0].item() == pytest.approx(-0.99296875)
        # symmetric apart from the extra 1.0
        assert torch.equal(code[:127], -code[128:255].flip(0))
    else:
        assert code.min() == 0.0


def test_quantize_bounds_are_fp32_midpoints_of_sorted_code():
    bounds, order = quantize_bounds(NF4_CODE)
    assert torch.equal(order, torch.arange(16))
    assert torch.equal(bounds, (NF4_CODE[:-1] + NF4_CODE[1:]) / 2)
    bounds, order = quantize_bounds(FP4_CODE)
    ordered = FP4_CODE[order]
    assert torch.all(ordered[1:] >= ordered[:-1])
    assert torch.equal(bounds, (ordered[:-1] + ordered[1:]) / 2)
    # the two zeros (patterns 0 and 8) keep index order: stable sort
    assert order[7] == 0 and order[8] == 8


def test_tables_equal_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_CODE, F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(True), F.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(False), F.create_dynamic_map(signed=False))
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    for quant_type, code in (("nf4", NF4_CODE), ("fp4", FP4_CODE)):
        bnb_bounds, bnb_order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
        bounds, order = quantize_bounds(code)
        assert torch.equal(bounds, bnb_bounds) and torch.equal(order, bnb_order)
