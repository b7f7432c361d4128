"""The C++ CPU kernels: bit-identical to the plain-torch reference and to bitsandbytes, on every ISA path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qlorakit.core.errors import QuantizationError
from qlorakit.quant import kernels
from qlorakit.quant.blockwise import dequantize_blocks, quantize_blocks_reference
from qlorakit.quant.codes import FP4_CODE, NF4_CODE, get_code

pytestmark = pytest.mark.skipif(not kernels.available(), reason="C++ kernels could not be built here")

ISAS = {"avx512": [0, 1, 2], "avx2": [0, 1], "scalar": [0]}.get(kernels.isa(), [0])
BLOCKSIZES = [32, 64, 128, 256, 1024, 4096]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so NaN payloads and signed zeros compare exactly."""
    return t.view(
        {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    )


def _sample(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 2, n).roll(seed)[torch.randperm(n, generator=g)]
    return x


def _random_packed(numel: int, blocksize: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8, generator=g)
    absmax = torch.rand(-(-numel // blocksize), generator=g) * 10
    return packed, absmax


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_bit_identical_to_reference(isa: int, out_dtype: torch.dtype, quant_type: str) -> None:
    code = get_code(quant_type)
    for blocksize in BLOCKSIZES:
        # full blocks, a partial last block, and an odd element count
        for numel in (blocksize * 7, blocksize * 5 + 34, blocksize * 3 + 17, 1):
            packed, absmax = _random_packed(numel, blocksize, seed=numel + blocksize)
            want = dequantize_blocks(packed, absmax, code, blocksize, numel, out_dtype, reference=True)
            out = torch.empty(numel, dtype=out_dtype)
            got = kernels.dequantize_blocks_cpu(packed, absmax, code, blocksize, out, force_isa=isa)
            assert got is out
            assert got.shape == (numel,) and got.dtype == out_dtype
            assert torch.equal(_bits(got), _bits(want)), (blocksize, numel)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_special_scales(isa: int, out_dtype: torch.dtype) -> None:
    # zero, subnormal, overflowing (fp16 -> inf), rounding ties, inf and NaN scales all cast like torch
    scales = [0.0, 1e-40, 7e4, 1.0 + 2**-8, 3.0e38, float("inf"), float("nan"), -2.5, 65504.0]
    blocksize = 32
    absmax = torch.tensor(scales, dtype=torch.float32)
    numel = blocksize * len(scales)
    packed = torch.arange(numel // 2, dtype=torch.int64).remainder(256).to(torch.uint8)
    want = dequantize_blocks(packed, absmax, NF4_CODE, blocksize, numel, out_dtype, reference=True)
    out = torch.empty(numel, dtype=out_dtype)
    got = kernels.dequantize_blocks_cpu(packed, absmax, NF4_CODE, blocksize, out, force_isa=isa)
    # torch itself writes NaN as 0x7FC0 or 0xFFFF in bf16 depending on the element's position: compare NaN-ness
    nan = want.isnan()
    assert nan.any() and torch.equal(got.isnan(), nan)
    assert torch.equal(_bits(got[~nan]), _bits(want[~nan]))


def _bnb_quantize(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnbf.quantize_4bit(
        x, blocksize=blocksize, compress_statistics=False, quant_type=quant_type, quant_storage=torch.uint8
    )
    return packed, state.absmax


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_byte_identical_to_bitsandbytes(isa: int, quant_type: str) -> None:
    code = get_code(quant_type)
    for blocksize in BLOCKSIZES:
        for n in (blocksize * 6, blocksize * 4 + 50, blocksize * 2 + 7, 3):
            x = _sample(n, seed=n + blocksize)
            want_packed, want_absmax = _bnb_quantize(x, blocksize, quant_type)
            packed, absmax = kernels.quantize_blocks_cpu(x, code, blocksize, force_isa=isa)
            assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
            assert torch.equal(packed, want_packed), (blocksize, n)
            assert torch.equal(_bits(absmax), _bits(want_absmax)), (blocksize, n)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_edge_values(isa: int, quant_type: str) -> None:
    """Midpoint ties, saturating values, all-zero full and partial blocks, tiny (subnormal) blocks."""
    code = get_code(quant_type)
    blocksize = 64
    bounds = (code.sort().values[:-1] + code.sort().values[1:]) / 2
    ties = torch.cat([bounds, -bounds, code, torch.tensor([1.0, -1.0])])
    ties = torch.nn.functional.pad(ties, (0, blocksize - ties.numel()))
    ties[-1] = 1.0  # absmax 1: the scaled values are the ties themselves
    tiny = torch.linspace(-1, 1, blocksize) * 1e-39
    zeros = torch.zeros(blocksize)
    for x in (
        torch.cat([ties, zeros, tiny, torch.randn(blocksize) * 1e30]),
        torch.cat([ties, zeros, torch.zeros(9)]),  # partial all-zero block with an odd count
        torch.cat([tiny, tiny[:33]]),
    ):
        want_packed, want_absmax = _bnb_quantize(x, blocksize, quant_type)
        packed, absmax = kernels.quantize_blocks_cpu(x, code, blocksize, force_isa=isa)
        assert torch.equal(packed, want_packed)
        assert torch.equal(_bits(absmax), _bits(want_absmax))
        ref_packed, ref_absmax = quantize_blocks_reference(x, code, blocksize)
        assert torch.equal(packed, ref_packed) and torch.equal(_bits(absmax), _bits(ref_absmax))


@pytest.mark.parametrize("isa", ISAS)
def test_quantize_non_finite_like_reference(isa: int) -> None:
    """NaN or inf in a block: the same bytes as the torch reference (NaN scale, NaN values to the top code)."""
    blocksize = 32
    x = torch.randn(blocksize * 4 + 10)
    x[3] = float("nan")
    x[blocksize + 5] = float("inf")
    x[2 * blocksize + 1] = float("-inf")
    x[4 * blocksize + 2] = float("nan")
    want_packed, want_absmax = quantize_blocks_reference(x, NF4_CODE, blocksize)
    packed, absmax = kernels.quantize_blocks_cpu(x, NF4_CODE, blocksize, force_isa=isa)
    assert torch.equal(packed, want_packed)
    assert torch.equal(_bits(absmax), _bits(want_absmax))


def test_thread_count_does_not_change_results() -> None:
    x = _sample(1 << 18, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        p1, a1 = kernels.quantize_blocks_cpu(x, NF4_CODE, 64)
        d1 = kernels.dequantize_blocks_cpu(p1, a1, NF4_CODE, 64, torch.empty_like(x, dtype=torch.bfloat16))
        torch.set_num_threads(2)
        p2, a2 = kernels.quantize_blocks_cpu(x, NF4_CODE, 64)
        d2 = kernels.dequantize_blocks_cpu(p2, a2, NF4_CODE, 64, torch.empty_like(x, dtype=torch.bfloat16))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(p1, p2) and torch.equal(a1, a2) and torch.equal(_bits(d1), _bits(d2))


def test_round_trip_matches_bitsandbytes_dequantize() -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 256, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    want = bnbf.dequantize_4bit(packed, state)
    got = kernels.dequantize_blocks_cpu(packed, state.absmax, NF4_CODE, 64, torch.empty_like(w))
    assert torch.equal(_bits(got), _bits(want))


def test_validation_errors_name_the_tensor() -> None:
    packed, absmax = _random_packed(128, 64, seed=0)
    ok = dict(packed=packed, absmax=absmax, code=NF4_CODE, blocksize=64, out=torch.empty(128))
    bad_cases = [
        ({"packed": packed.to(torch.int8)}, "packed must be torch.uint8"),
        ({"absmax": absmax.double()}, "absmax must be torch.float32"),
        ({"absmax": absmax[:1]}, "absmax must have 2 elements"),
        ({"packed": packed[:10]}, "packed must have 64 elements"),
        ({"code": NF4_CODE[:8]}, "code must have 16 elements"),
        ({"blocksize": 63}, "invalid blocksize 63"),
        ({"out": torch.empty(128, dtype=torch.float64)}, "out must be float32, bfloat16 or float16"),
        ({"out": torch.empty(256)[::2]}, "out must be contiguous"),
        ({"packed": torch.empty(128, dtype=torch.uint8)[::2]}, "packed must be contiguous"),
        ({"absmax": absmax.to("meta")}, "absmax is on meta"),
    ]
    for change, message in bad_cases:
        with pytest.raises(QuantizationError, match=message):
            kernels.dequantize_blocks_cpu(**{**ok, **change})
    with pytest.raises(QuantizationError, match="flat must be torch.float32"):
        kernels.quantize_blocks_cpu(torch.randn(64, dtype=torch.float64), NF4_CODE, 64)
    with pytest.raises(QuantizationError, match="flat must be 1-D"):
        kernels.quantize_blocks_cpu(torch.randn(4, 64), NF4_CODE, 64)
    with pytest.raises(QuantizationError, match="flat must be contiguous"):
        kernels.quantize_blocks_cpu(torch.randn(256)[::2], NF4_CODE, 64)
    with pytest.raises(QuantizationError, match="force_isa=7"):
        kernels.quantize_blocks_cpu(torch.randn(64), FP4_CODE, 64, force_isa=7)


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


_PROBE = """
import warnings
warnings.simplefilter("always")
from qlorakit.quant import kernels
print("AVAILABLE", kernels.available())
"""


@pytest.mark.slow
def test_compiled_library_is_cached_across_processes(tmp_path: Path) -> None:
    env = {"QLORAKIT_CACHE": str(tmp_path), "QLORAKIT_NO_KERNELS": ""}
    first = _run(_PROBE, env)
    assert "AVAILABLE True" in first.stdout, first.stderr
    libraries = list(tmp_path.glob("ext/*/*.so"))
    assert len(libraries) == 1
    stamp = libraries[0].stat().st_mtime_ns
    second = _run(_PROBE, env)
    assert "AVAILABLE True" in second.stdout, second.stderr
    assert list(tmp_path.glob("ext/*/*.so")) == libraries
    assert libraries[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_disabled_by_environment() -> None:
    result = _run(_PROBE, {"QLORAKIT_NO_KERNELS": "1"})
    assert "AVAILABLE False" in result.stdout, result.stderr
    assert "Warning" not in result.stderr


def test_build_failure_warns_once_and_falls_back(tmp_path: Path) -> None:
    probe = _PROBE + textwrap.dedent("""
    import torch
    from qlorakit.quant.blockwise import quantize_4bit, dequantize_4bit
    w = torch.randn(8, 64)
    packed, state = quantize_4bit(w)
    print("SHAPE", tuple(dequantize_4bit(packed, state).shape), kernels.available())
    """)
    result = _run(probe, {"QLORAKIT_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")})
    assert "AVAILABLE False" in result.stdout, result.stderr
    assert "SHAPE (8, 64) False" in result.stdout, result.stderr
    warning_lines = [line for line in result.stderr.splitlines() if "C++ CPU kernels unavailable" in line]
    assert len(warning_lines) == 1
