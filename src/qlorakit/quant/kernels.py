"""The C++ CPU fast path for 4-bit blockwise quantization (bitsandbytes semantics, bit-identical results).

The kernels live in `csrc/nf4_cpu.cpp`, handed to and compiled by `qlorakit.core.native` (see there: the build
cache, the one-line warning and plain-torch fallback when no compiler is available, `QLORAKIT_NO_KERNELS=1`).
This module validates every tensor, allocates the outputs and calls the C functions.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from qlorakit.core import native
from qlorakit.core.errors import QuantizationError
from qlorakit.quant.codes import quantize_bounds
from qlorakit.quant.settings import check_blocksize

_I64, _P, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
SOURCE = native.register(
    Path(__file__).parent / "csrc" / "nf4_cpu.cpp",
    {
        "qlk_best_isa": (_I64, []),
        "qlk_dequantize": (_INT, [_P, _P, _P, _I64, _I64, ctypes.c_int32, _P, _I64]),
        "qlk_quantize": (_INT, [_P, _I64, _P, _P, _I64, _P, _P, _I64]),
    },
)

_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def available() -> bool:
    """True when these kernels are compiled and usable in this process (compiles them on first call)."""
    return native.available(SOURCE)


_best_isa: int | None = None


def best_isa() -> int:
    """The widest vector path this CPU runs: 2 AVX-512, 1 AVX2, 0 scalar (0 when the kernels are unavailable).

    The one CPU probe of qlorakit's kernels (`qlk_best_isa`); the dropout kernels take its answer too."""
    global _best_isa
    if _best_isa is None:
        lib = native.library(SOURCE)
        if lib is None:
            return 0
        _best_isa = int(lib.qlk_best_isa())
    return _best_isa


def isa() -> str:
    """The vector instruction set the kernels use here: "avx512", "avx2", "scalar" or "none" (unavailable)."""
    return {2: "avx512", 1: "avx2", 0: "scalar"}[best_isa()] if available() else "none"


def _require() -> ctypes.CDLL:
    lib = native.library(SOURCE)
    if lib is None:
        raise QuantizationError(
            "the qlorakit C++ CPU kernels are not available (see the earlier warning, or unset "
            "QLORAKIT_NO_KERNELS); call qlorakit.quant.blockwise instead, which falls back to plain torch"
        )
    return lib


def _check_cpu(name: str, t: torch.Tensor, dtype: torch.dtype, numel: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise QuantizationError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise QuantizationError(f"{name} is on {t.device}; the C++ kernels run on CPU tensors only")
    if t.dtype != dtype:
        raise QuantizationError(f"{name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise QuantizationError(f"{name} must be contiguous; call .contiguous() first")
    if numel is not None and t.numel() != numel:
        raise QuantizationError(
            f"{name} must have {numel} elements, got {t.numel()} (shape {tuple(t.shape)})"
        )


def _isa_for(force_isa: int | None) -> int:
    best = best_isa()
    if force_isa is None:
        return best
    if force_isa not in (0, 1, 2) or force_isa > best:
        raise QuantizationError(f"force_isa={force_isa} is not usable here (best is {best})")
    return force_isa


def dequantize_blocks_cpu(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    out: torch.Tensor,
    *,
    force_isa: int | None = None,
) -> torch.Tensor:
    """Dequantize 4-bit blocks into `out`: `out[i] = code[nibble_i] * absmax[i // blocksize]` in fp32, then
    cast (RNE) to out's dtype; returns `out`.

    packed: uint8 [(numel + 1) // 2] or [(numel + 1) // 2, 1], high nibble first; absmax: fp32 [nblocks];
    code: fp32 [16]; out: contiguous float32, bfloat16 or float16 of numel elements (any shape; the caller
    owns it, so a buffer can be reused). force_isa (0 scalar, 1 AVX2, 2 AVX-512) pins a code path; tests use
    it to compare them.
    """
    lib = _require()
    check_blocksize(blocksize)
    if out.dtype not in _OUT_KINDS:
        raise QuantizationError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
    _check_cpu("out", out, out.dtype)
    numel = out.numel()
    _check_cpu("packed", packed, torch.uint8, (numel + 1) // 2)
    _check_cpu("absmax", absmax, torch.float32, -(-numel // blocksize))
    _check_cpu("code", code, torch.float32, 16)
    if numel == 0:
        return out
    rc = lib.qlk_dequantize(
        packed.data_ptr(),
        absmax.data_ptr(),
        code.data_ptr(),
        blocksize,
        numel,
        _OUT_KINDS[out.dtype],
        out.data_ptr(),
        _isa_for(force_isa),
    )
    if rc != 0:
        raise QuantizationError("the C++ dequantize kernel failed in a worker thread")
    return out


def quantize_blocks_cpu(
    flat: torch.Tensor, code: torch.Tensor, blocksize: int, *, force_isa: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize fp32 values blockwise to 4-bit codes, byte-identical to bitsandbytes on CPU.

    flat: fp32 contiguous [n]; code: fp32 [16]. Returns (packed uint8 [(n + 1) // 2, 1] with the first
    element of each pair in the high nibble and an odd count padded with the code of 0.0, absmax fp32
    [ceil(n / blocksize)]). Full blocks scale by the fp32 reciprocal of max(absmax, 1e-38) and store absmax
    (0.0 for an all-zero block); a trailing partial block divides by max(absmax, 1e-38) and stores that
    clamped value, as bitsandbytes does.
    """
    lib = _require()
    check_blocksize(blocksize)
    _check_cpu("flat", flat, torch.float32)
    if flat.dim() != 1:
        raise QuantizationError(f"flat must be 1-D, got shape {tuple(flat.shape)}; pass tensor.reshape(-1)")
    _check_cpu("code", code, torch.float32, 16)
    n = flat.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    if n == 0:
        return packed, absmax
    bounds, order = quantize_bounds(code)
    mids = bounds.contiguous()
    order = order.to(torch.uint8).contiguous()
    rc = lib.qlk_quantize(
        flat.data_ptr(),
        n,
        mids.data_ptr(),
        order.data_ptr(),
        blocksize,
        packed.data_ptr(),
        absmax.data_ptr(),
        _isa_for(force_isa),
    )
    if rc != 0:
        raise QuantizationError("the C++ quantize kernel failed in a worker thread")
    return packed, absmax


__all__ = [
    "available",
    "best_isa",
    "dequantize_blocks_cpu",
    "isa",
    "quantize_blocks_cpu",
]
