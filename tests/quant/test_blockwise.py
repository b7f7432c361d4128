"""4-bit blockwise quantization: byte-identical to bitsandbytes (live and golden), error bounds, bad input."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open

from qlorakit.core.errors import QuantizationError
from qlorakit.quant import (
    FP4_CODE,
    NF4_CODE,
    bits_per_parameter,
    dequantize_4bit,
    get_code,
    quantize_4bit,
)
from qlorakit.quant import blockwise as bw
from qlorakit.quant.codes import DYNAMIC_CODE, quantize_bounds

GOLDEN = Path(__file__).with_name("golden")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCKSIZES = (32, 64, 128, 256, 4096)
SHAPES = ((37,), (24, 40), (3, 5, 7), (2, 3, 128), (300, 64), (1,))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a tensor (so -0.0 != 0.0 and dtypes must agree)."""
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(as_int)


def assert_same_bits(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    mismatch = (bits(ours) != bits(theirs)).sum().item()
    assert mismatch == 0, f"{what}: {mismatch} of {ours.numel()} elements differ"


def make_input(shape, dtype, gen):
    """Gaussian rows with per-column scales (uneven blocks), a few outliers and a zero run."""
    scale = torch.rand(shape[-1], generator=gen) * 3 + 0.01
    A = torch.randn(shape, generator=gen) * scale
    flat = A.view(-1)
    if flat.numel() > 40:
        flat[5:40] = 0
        flat[-1] = 25.0
    return A.to(dtype)


@pytest.fixture(autouse=True)
def _seed():
    """Unseeded draws in a test are reproducible too."""
    torch.manual_seed(0)


@pytest.fixture(params=["reference", "dispatch"])
def path(request, monkeypatch):
    """Run once on the plain-torch reference, once through the dispatcher (C++ fast path if it compiles)."""
    if request.param == "reference":
        monkeypatch.setenv("QLORAKIT_NO_KERNELS", "1")
    else:
        monkeypatch.delenv("QLORAKIT_NO_KERNELS", raising=False)
    return request.param


@pytest.fixture
def bnb():
    F = pytest.importorskip("bitsandbytes.functional")
    # bitsandbytes wraps its plain-torch dequantization in torch.compile; eager is identical and fast.
    # (torch._dynamo.config is a config module: assign and restore, monkeypatch cannot undo it)
    config = torch._dynamo.config
    before = config.disable
    config.disable = True
    yield F
    config.disable = before


def bnb_dequant_reference(F, packed, state):
    """bitsandbytes' own plain-torch dequantization (its `default` backend), usable for every shape."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, quant_state=state.state2) + state.offset
    code = F.get_4bit_type(state.quant_type, device="cpu")
    return _dequantize_4bit_compute(
        packed.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype
    )


def cpu_kernel_row_consistent(shape, blocksize):
    """Where the bitsandbytes CPU C++ dequantize agrees with its own reference.

    It is used for an even last dimension and blocksize < 2048, and indexes absmax per row, so it returns
    wrong values when a block straddles rows (last dimension not a multiple of the blocksize).
    """
    return len(shape) == 1 or shape[-1] % 2 == 1 or blocksize >= 2048 or shape[-1] % blocksize == 0


def compare_with_bnb(F, A, blocksize, quant_type, double_quant):
    theirs_packed, theirs = F.quantize_4bit(
        A,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=torch.uint8,
    )
    packed, state = quantize_4bit(A, blocksize, quant_type, double_quant)
    what = f"{quant_type} bs={blocksize} dq={double_quant} {A.dtype} {tuple(A.shape)}"
    assert_same_bits(packed, theirs_packed, f"packed {what}")
    assert_same_bits(state.absmax, theirs.absmax, f"absmax {what}")
    assert_same_bits(state.code, theirs.code, f"code {what}")
    assert state.shape == theirs.shape and state.dtype == theirs.dtype and state.blocksize == theirs.blocksize
    assert (state.nested is not None) == theirs.nested
    if double_quant:
        assert_same_bits(state.nested.absmax, theirs.state2.absmax, f"nested absmax {what}")
        assert_same_bits(state.nested.code, theirs.state2.code, f"nested code {what}")
        assert (
            state.nested.offset == theirs.offset.item() and state.nested.blocksize == theirs.state2.blocksize
        )
    out = dequantize_4bit(packed, state)
    assert_same_bits(
        out.reshape(-1), bnb_dequant_reference(F, theirs_packed, theirs).reshape(-1), f"dequant {what}"
    )
    if cpu_kernel_row_consistent(A.shape, blocksize):
        public = F.dequantize_4bit(theirs_packed, theirs).reshape(-1)
        ours = out.reshape(-1)
        if quant_type == "fp4":
            # the C++ kernel decodes FP4 pattern 8 as -0.0 where the code table (and bitsandbytes' own
            # reference path, and qlorakit) has +0.0: equal values, compare with the sign of zero dropped
            ours, public = ours + 0.0, public + 0.0
        assert_same_bits(ours, public, f"bnb.dequantize_4bit {what}")


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sweep_matches_bitsandbytes(bnb, path, dtype, quant_type, double_quant):
    gen = torch.Generator().manual_seed(DTYPES.index(dtype) * 4 + (quant_type == "fp4") * 2 + double_quant)
    for blocksize, shape in itertools.product(BLOCKSIZES, SHAPES):
        compare_with_bnb(bnb, make_input(shape, dtype, gen), blocksize, quant_type, double_quant)


def test_many_blocks_and_large_values_match_bitsandbytes(bnb, path):
    # > 256 blocks (several nested blocks, the last partial), wide dynamic range, bf16 extremes
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(130, 257, generator=gen) * torch.logspace(-4, 4, 257)
    compare_with_bnb(bnb, A, 32, "nf4", True)
    compare_with_bnb(bnb, A.to(torch.bfloat16), 64, "fp4", True)
    big = torch.full((4, 64), 3.0e37, dtype=torch.bfloat16)
    big[0, 0] = -1.0e38
    compare_with_bnb(bnb, big, 64, "nf4", True)
    huge = torch.full((4, 64), 3.0e38, dtype=torch.bfloat16)
    compare_with_bnb(bnb, huge, 64, "fp4", False)
    # the fp32 mean of these absmax overflows: bitsandbytes returns garbage, qlorakit refuses
    with pytest.raises(QuantizationError, match="overflows float32.*double_quant=False"):
        quantize_4bit(huge, 64, "nf4", True, name="w")


def test_zero_and_tiny_blocks_match_bitsandbytes(bnb, path):
    # all-zero full blocks store absmax 0; an all-zero partial block stores 1e-38; subnormal blocks
    cases = [
        torch.zeros(200),
        torch.zeros(3, 64, dtype=torch.bfloat16),
        # seed 4 puts tiny positives in FP4 pattern 8 ("-0")
        torch.cat(
            [
                torch.randn(64, generator=torch.Generator().manual_seed(4)),
                torch.zeros(64),
                torch.full((10,), 1e-39),
            ]
        ),
        torch.cat([torch.zeros(128), torch.tensor([-0.0, 0.0, 1e-45])]),
        torch.ones(5000),
    ]
    for A, (quant_type, double_quant) in itertools.product(
        cases, [("nf4", True), ("fp4", True), ("nf4", False)]
    ):
        compare_with_bnb(bnb, A, 64, quant_type, double_quant)
    packed, state = quantize_4bit(torch.zeros(130), 64, "nf4", False)
    assert state.absmax.tolist()[:2] == [0.0, 0.0]
    assert state.absmax[2].item() == pytest.approx(1e-38, rel=1e-6)
    assert torch.all(packed == 0x77), "zero maps to NF4 index 7 in both nibbles"


def test_random_property_sweep_matches_bitsandbytes(bnb, path):
    """Seeded random shapes, scales, dtypes and settings (a property test without hypothesis)."""
    gen = torch.Generator().manual_seed(2024)
    for _ in range(40):
        ndim = int(torch.randint(1, 4, (1,), generator=gen))
        shape = tuple(int(d) for d in torch.randint(1, 40, (ndim,), generator=gen))
        dtype = DTYPES[int(torch.randint(0, 3, (1,), generator=gen))]
        blocksize = 2 ** int(torch.randint(5, 13, (1,), generator=gen))
        scale = 10 ** float(torch.empty(1).uniform_(-6, 4, generator=gen))
        A = (torch.randn(shape, generator=gen) * scale).to(dtype)
        quant_type = ("nf4", "fp4")[int(torch.randint(0, 2, (1,), generator=gen))]
        compare_with_bnb(bnb, A, blocksize, quant_type, bool(torch.randint(0, 2, (1,), generator=gen)))


def test_dynamic_8bit_matches_bitsandbytes_on_bin_boundaries(bnb):
    """The nested quantizer maps onto a 65536-bin grid: hit the bin edges, where rounding decides."""
    gen = torch.Generator().manual_seed(11)
    k = torch.randint(1, 65535, (256 * 63,), generator=gen).double()
    # (t * 65535 + 0.5) lands on an integer: v = 2 * (k - 0.5) / 65535 - 1, nudged by a few ulps
    v = (2 * (k - 0.5) / 65535 - 1).float()
    v = v + torch.randint(-3, 4, v.shape, generator=gen) * torch.finfo(torch.float32).eps * v.abs()
    blocks = v.clamp(-1, 1).view(-1, 256)
    blocks[:, 0] = 1.0  # absmax 1: scaling is exact, the grid decides
    scaled = torch.randn(256 * 40, generator=gen) * torch.rand(256 * 40, generator=gen).pow(4)
    values = torch.cat([blocks.reshape(-1), scaled, torch.zeros(256), torch.randn(77, generator=gen)])
    q, absmax = bw.quantize_dynamic_reference(values, DYNAMIC_CODE, 256)
    theirs_q, theirs = bnb.quantize_blockwise(values, blocksize=256)
    assert_same_bits(absmax, theirs.absmax, "absmax2")
    assert_same_bits(q, theirs_q, "dynamic codes")


def load_golden(name):
    path = GOLDEN / f"{name}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


GOLDEN_CASES = sorted(p.stem for p in GOLDEN.glob("*.safetensors") if p.stem[:3] in ("nf4", "fp4"))


def test_golden_files_exist():
    assert len(GOLDEN_CASES) >= 8, "run tests/quant/make_golden.py to write the golden vectors"


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_matches_golden_vectors(path, name):
    t, meta = load_golden(name)
    double_quant = json.loads(meta["double_quant"])
    packed, state = quantize_4bit(t["input"], int(meta["blocksize"]), meta["quant_type"], double_quant)
    assert_same_bits(packed, t["packed"], "packed")
    assert_same_bits(state.absmax, t["absmax"], "absmax")
    if double_quant:
        assert_same_bits(state.nested.absmax, t["nested_absmax"], "nested absmax")
        assert_same_bits(state.nested.code, t["nested_code"], "nested code")
        assert state.nested.offset == float(meta["nested_offset"])
    if "dequant" in t:
        assert_same_bits(dequantize_4bit(packed, state), t["dequant"], "dequant")


def test_golden_dynamic_8bit():
    t, _ = load_golden("dynamic8_bs256")
    assert_same_bits(DYNAMIC_CODE, t["code"], "dynamic map")
    q, absmax = bw.quantize_dynamic_reference(t["values"], t["code"], 256)
    assert_same_bits(q, t["codes"], "codes")
    assert_same_bits(absmax, t["absmax"], "absmax2")
    assert absmax[1] == 0 and torch.all(q[256:512] == 0), "an all-zero block stores absmax 0 and code 0"


def test_midpoint_ties_go_to_the_lower_code(path):
    for code in (NF4_CODE, FP4_CODE):
        bounds, order = quantize_bounds(code)
        # a leading 1.0 makes absmax 1, so the scaled values are the midpoints exactly
        A = torch.cat([torch.ones(1), bounds, torch.zeros(64 - 16)])
        quant_type = "nf4" if code is NF4_CODE else "fp4"
        packed, _ = quantize_4bit(A, 64, quant_type, False)
        nibbles = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)
        assert torch.equal(nibbles[1:16].long(), order[:15]), quant_type


def test_pairs_pack_high_nibble_first(path):
    A = torch.tensor([-1.0, 1.0, 0.0, -1.0, 1.0])  # odd count: padded with zero (NF4 index 7)
    packed, state = quantize_4bit(A, 32, "nf4", False)
    assert packed.shape == (3, 1) and packed.dtype == torch.uint8
    assert packed.view(-1).tolist() == [0x0F, 0x70, 0xF7]
    assert_same_bits(dequantize_4bit(packed, state), A, "exact codes")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_roundtrip_error_matches_quantization_noise_statistics(path, quant_type):
    """N(0,1) data: RMSE / absmax predicted from the bin geometry, and a hard per-element bound."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(256, 512, generator=gen)
    code = get_code(quant_type)
    packed, state = quantize_4bit(A, 64, quant_type, False)
    err = (dequantize_4bit(packed, state) - A).view(-1, 64) / state.absmax.view(-1, 1)
    bounds, order = quantize_bounds(code)
    ordered = code[order]
    # hard bound: at most half the widest gap between neighbouring codes (plus rounding)
    assert err.abs().max() <= (ordered[1:] - ordered[:-1]).max() / 2 * (1 + 1e-5)
    # uniform density inside each bin [lo, hi] around its code c: E[err^2] = ((hi-c)^3 + (c-lo)^3) / (3 (hi-lo))
    x = (A.view(-1, 64) / state.absmax.view(-1, 1)).reshape(-1)
    k = torch.searchsorted(bounds, x)
    edges = torch.cat([torch.tensor([-1.0]), bounds, torch.tensor([1.0])])
    lo, hi, c = edges[k], edges[k + 1], ordered[k]
    predicted = (((hi - c) ** 3 + (c - lo) ** 3) / (3 * (hi - lo))).mean().sqrt()
    measured = err.pow(2).mean().sqrt()
    # the density of N(0,1) falls across each bin, so the uniform prediction is a slight overestimate
    assert 0.85 * predicted < measured < 1.02 * predicted, (measured.item(), predicted.item())


def test_nf4_beats_fp4_on_normal_weights(path):
    A = torch.randn(128, 512, generator=torch.Generator().manual_seed(8)) * 0.02
    rmse = {}
    for quant_type in ("nf4", "fp4"):
        packed, state = quantize_4bit(A, 64, quant_type, True)
        rmse[quant_type] = (dequantize_4bit(packed, state) - A).pow(2).mean().sqrt().item()
    assert rmse["nf4"] < 0.95 * rmse["fp4"], rmse


def test_dequantized_values_are_fixed_points(path):
    """quantize(dequantize(q)) decodes to the same values: each output is code * absmax (property sweep)."""
    gen = torch.Generator().manual_seed(21)
    for _ in range(12):
        n = int(torch.randint(1, 3000, (1,), generator=gen))
        blocksize = 2 ** int(torch.randint(5, 13, (1,), generator=gen))
        quant_type = ("nf4", "fp4")[int(torch.randint(0, 2, (1,), generator=gen))]
        double_quant = bool(torch.randint(0, 2, (1,), generator=gen))
        A = torch.randn(n, generator=gen) * 10 ** float(torch.empty(1).uniform_(-3, 3, generator=gen))
        packed, state = quantize_4bit(A, blocksize, quant_type, double_quant)
        once = dequantize_4bit(packed, state)
        packed2, state2 = quantize_4bit(once, blocksize, quant_type, False)
        twice = dequantize_4bit(packed2, state2)
        torch.testing.assert_close(twice, once, rtol=2e-7, atol=0)


def test_out_dtype_and_shapes(path):
    A = torch.randn(3, 4, 10, dtype=torch.bfloat16)
    packed, state = quantize_4bit(A)
    assert state.shape == A.shape and state.dtype == torch.bfloat16
    assert dequantize_4bit(packed, state).dtype == torch.bfloat16
    out32 = dequantize_4bit(packed, state, out_dtype=torch.float32)
    assert out32.shape == A.shape and out32.dtype == torch.float32
    assert_same_bits(
        dequantize_4bit(packed, state, torch.float16), out32.to(torch.float16), "fp16 cast of fp32"
    )
    assert_same_bits(dequantize_4bit(packed, state), out32.to(torch.bfloat16), "bf16 cast of fp32")


def test_non_contiguous_input_equals_contiguous(path):
    A = torch.randn(64, 96).t()
    assert not A.is_contiguous()
    p1, s1 = quantize_4bit(A)
    p2, s2 = quantize_4bit(A.contiguous())
    assert_same_bits(p1, p2, "packed")
    assert_same_bits(s1.absmax, s2.absmax, "absmax")


def test_reference_and_dispatch_agree_on_large_tensor(monkeypatch):
    A = torch.randn(257, 1000, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    monkeypatch.setenv("QLORAKIT_NO_KERNELS", "1")
    p_ref, s_ref = quantize_4bit(A, 64, "nf4", True)
    d_ref = dequantize_4bit(p_ref, s_ref)
    monkeypatch.delenv("QLORAKIT_NO_KERNELS")
    p, s = quantize_4bit(A, 64, "nf4", True)
    assert_same_bits(p, p_ref, "packed")
    assert_same_bits(s.absmax, s_ref.absmax, "absmax")
    assert_same_bits(dequantize_4bit(p, s), d_ref, "dequant")


def test_env_var_and_unavailable_kernels_select_the_reference(monkeypatch):
    monkeypatch.setenv("QLORAKIT_NO_KERNELS", "1")
    assert bw._cpu_kernels() is None
    monkeypatch.delenv("QLORAKIT_NO_KERNELS")
    # kernels that cannot be built here (no compiler)
    monkeypatch.setattr(bw.kernels, "available", lambda: False)
    assert bw._cpu_kernels() is None
    packed, state = quantize_4bit(torch.randn(100))
    assert packed.shape == (50, 1)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 96, 8192, -64, True, 64.0, "64"])
def test_bad_blocksize(blocksize):
    with pytest.raises(QuantizationError, match="invalid blocksize"):
        quantize_4bit(torch.randn(128), blocksize=blocksize)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(QuantizationError, match="unknown quant_type 'int4'"):
        quantize_4bit(torch.randn(64), quant_type="int4")
    with pytest.raises(QuantizationError, match=r"empty tensor 'layer\.w' of shape \(0, 4\)"):
        quantize_4bit(torch.zeros(0, 4), name="layer.w")
    for dtype in (torch.int32, torch.int8, torch.uint8, torch.bool, torch.float64):
        with pytest.raises(QuantizationError, match="float32, bfloat16 or float16"):
            quantize_4bit(torch.zeros(64, dtype=dtype))
    with pytest.raises(QuantizationError, match="expected a torch.Tensor"):
        quantize_4bit([1.0, 2.0])


def test_non_finite_error_names_tensor_count_and_first_index():
    A = torch.randn(4, 8, dtype=torch.bfloat16)
    A[1, 3] = float("nan")
    A[2, 0] = float("inf")
    A[3, 7] = float("-inf")
    with pytest.raises(QuantizationError) as info:
        quantize_4bit(A, name="model.layers.0.mlp.up_proj.weight")
    msg = str(info.value)
    assert "'model.layers.0.mlp.up_proj.weight'" in msg and "(4, 8)" in msg
    assert "3 non-finite" in msg and "(1, 3)" in msg and "nan" in msg


def test_dequantize_rejects_inconsistent_input():
    packed, state = quantize_4bit(torch.randn(10, 10))
    with pytest.raises(QuantizationError, match="uint8"):
        dequantize_4bit(packed.to(torch.int32), state)
    with pytest.raises(QuantizationError, match="50 bytes for 100 elements"):
        dequantize_4bit(packed[:-1], state)
    with pytest.raises(QuantizationError, match="out_dtype"):
        dequantize_4bit(packed, state, out_dtype=torch.int8)
    with pytest.raises(QuantizationError, match="absmax must be float32 with 2 entries"):
        bw.dequantize_blocks(packed, torch.ones(3), NF4_CODE, 64, 100, torch.float32, reference=True)


def test_bits_per_parameter_on_real_tensors():
    A = torch.randn(64, 4096)
    _, plain = quantize_4bit(A, 64, "nf4", False)
    assert bits_per_parameter(plain) == 4.5
    _, nested = quantize_4bit(A, 64, "nf4", True)
    expected = 4 + 8 / 64 + 32 * math.ceil(A.numel() / 64 / 256) / A.numel()
    assert bits_per_parameter(nested) == pytest.approx(expected, rel=1e-12)
    assert bits_per_parameter(nested) == pytest.approx(4.127, abs=5e-4)
    _, odd = quantize_4bit(torch.randn(7), 32, "fp4", False)
    assert bits_per_parameter(odd) == (8 * 4 + 32) / 7  # padding nibble and one absmax
