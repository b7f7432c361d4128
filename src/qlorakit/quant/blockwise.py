"""4-bit blockwise quantization (NF4 / FP4) with optional double quantization, bit-exact with bitsandbytes.

The reference paths are plain vectorised torch (any device) and define the arithmetic; on CPU an
optional C++ fast path (`qlorakit.quant.kernels`) computes the same bytes. Set `QLORAKIT_NO_KERNELS=1` to
force the reference path.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from qlorakit.core.dtypes import FLOAT_DTYPES
from qlorakit.core.errors import QuantizationError
from qlorakit.quant import kernels
from qlorakit.quant.codes import DYNAMIC_CODE, get_code, quantize_bounds
from qlorakit.quant.settings import check_blocksize
from qlorakit.quant.state import NestedState, QuantState

NESTED_BLOCKSIZE = 256
# bitsandbytes clamps the block scale before taking its reciprocal (all-zero blocks)
_MIN_ABSMAX = 1e-38
# the CPU 8-bit quantizer of bitsandbytes maps [-1, 1] onto this many bins, then a lookup table
_LUT_SIZE = 65536


def _cpu_kernels() -> ModuleType | None:
    """The C++ fast path module if it is enabled and compiled; else None (reference path)."""
    if os.environ.get("QLORAKIT_NO_KERNELS", "").strip().lower() not in ("", "0", "false", "no"):
        return None
    return kernels if kernels.available() else None


def _describe(A: torch.Tensor, name: str | None) -> str:
    label = f"tensor {name!r}" if name else "tensor"
    return f"{label} of shape {tuple(A.shape)} ({A.dtype})"


def _check_input(A: torch.Tensor, name: str | None) -> None:
    if not isinstance(A, torch.Tensor):
        raise QuantizationError(f"{name or 'input'}: expected a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in FLOAT_DTYPES.values():
        raise QuantizationError(
            f"cannot quantize {_describe(A, name)}: 4-bit quantization takes float32, bfloat16 or float16 "
            "(convert with .float() or .to(torch.bfloat16))"
        )
    if A.numel() == 0:
        raise QuantizationError(f"cannot quantize the empty {_describe(A, name)}")
    finite = torch.isfinite(A)
    if not bool(finite.all()):
        bad = ~finite.reshape(-1)
        first = int(bad.nonzero()[0, 0])
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), A.shape))
        raise QuantizationError(
            f"cannot quantize {_describe(A, name)}: {int(bad.sum())} non-finite value(s), the first at index "
            f"{index} is {A.reshape(-1)[first].item()}; fix the weights (NaN/Inf) before quantizing"
        )


def quantize_blocks_reference(
    flat: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code 4-bit quantization of fp32 [n] in blocks; returns (packed uint8 [(n+1)//2, 1], absmax fp32 [nblocks]).

    Full blocks are scaled by the reciprocal of max(absmax, 1e-38); the partial last block is divided by its
    (clamped) absmax, which is also what is stored for it. Values are clamped to [-1, 1] and compared with
    the code midpoints with strict `>`; the first element of each pair goes to the high nibble.
    """
    check_blocksize(blocksize)
    flat = flat.reshape(-1).to(torch.float32)
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].reshape(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    scaled = torch.clamp(head * (1.0 / absmax.clamp(min=_MIN_ABSMAX)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().amax().clamp(min=_MIN_ABSMAX)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(tail / tail_absmax, -1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    bounds, order = quantize_bounds(code.detach().cpu())
    q = torch.searchsorted(bounds.to(flat.device), scaled, out_int32=True)
    if not torch.equal(order, torch.arange(order.numel())):
        q = order.to(device=flat.device, dtype=torch.int32)[q]
    q = q.to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    return packed, absmax


def _check_blocks(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int) -> None:
    check_blocksize(blocksize)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
        raise QuantizationError(
            f"packed 4-bit data must be uint8 with {(numel + 1) // 2} bytes for {numel} elements, "
            f"got {packed.dtype} {list(packed.shape)}"
        )
    nblocks = -(-numel // blocksize)
    if absmax.dtype != torch.float32 or absmax.numel() != nblocks:
        raise QuantizationError(
            f"absmax must be float32 with {nblocks} entries ({numel} elements in blocks of {blocksize}), "
            f"got {absmax.dtype} {list(absmax.shape)}"
        )


def quantize_blocks(
    flat: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: the C++ fast path for CPU tensors when available, else `quantize_blocks_reference`."""
    kernels = _cpu_kernels() if flat.device.type == "cpu" else None
    if kernels is not None:
        return kernels.quantize_blocks_cpu(flat.contiguous(), code, blocksize)
    return quantize_blocks_reference(flat, code, blocksize)


def dequantize_blocks(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    numel: int,
    out_dtype: torch.dtype,
    *,
    reference: bool = False,
) -> torch.Tensor:
    """out[i] = code[nibble_i] * absmax[i // blocksize] in fp32, then cast to `out_dtype`; returns [numel].

    CPU tensors take the C++ fast path when it is available; `reference=True` (or any other device) takes
    the plain-torch reference, which defines the arithmetic the kernel matches bit for bit.
    """
    _check_blocks(packed, absmax, blocksize, numel)
    kernels = _cpu_kernels() if packed.device.type == "cpu" and not reference else None
    if kernels is not None:
        out = torch.empty(numel, dtype=out_dtype)
        return kernels.dequantize_blocks_cpu(packed.contiguous(), absmax, code, blocksize, out)
    p = packed.reshape(-1)
    nibbles = torch.stack((p >> 4, p & 0x0F), dim=1).reshape(-1).to(torch.int32)
    nblocks = absmax.numel()
    values = code.to(torch.float32)[nibbles]
    values = torch.nn.functional.pad(values, (0, nblocks * blocksize - values.numel()))
    out = (values.view(nblocks, blocksize) * absmax.view(nblocks, 1)).reshape(-1)[:numel]
    return out.to(out_dtype)


def _build_dynamic_lut(code: torch.Tensor) -> torch.Tensor:
    """uint8 [65536]: for the grid value -1 + 2i/65535 (fp32), the number of code midpoints below it.

    Midpoints are `0.5 * (code[j] + code[j + 1])` in fp32; a grid value equal to a midpoint stays low.
    """
    midpoints = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)
    grid = (2.0 * i) / (_LUT_SIZE - 1) - 1.0
    return torch.searchsorted(midpoints, grid).to(torch.uint8)


# Building the table costs far more than using it on a layer's absmax: keep a few (code, device) tables.
_LUT_CACHE: dict[tuple[str, bytes], torch.Tensor] = {}
_LUT_CACHE_SLOTS = 8


def _dynamic_lut(code: torch.Tensor) -> torch.Tensor:
    key = (str(code.device), code.detach().cpu().numpy().tobytes())
    lut = _LUT_CACHE.get(key)
    if lut is None:
        if len(_LUT_CACHE) >= _LUT_CACHE_SLOTS:
            _LUT_CACHE.pop(next(iter(_LUT_CACHE)))
        lut = _LUT_CACHE[key] = _build_dynamic_lut(code)
    return lut


def quantize_dynamic_reference(
    values: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization onto a sorted 256-entry `code` (double quantization of absmax).

    values fp32 [m] -> (codes uint8 [m], absmax fp32 [ceil(m / blocksize)]). Matches bitsandbytes on CPU:
    v = clamp(x * (1 / absmax), -1, 1); bin = trunc(fma((v + 1) * 0.5, 65535, 0.5)); code index = LUT[bin],
    the nearest code entry to the bin centre. An all-zero block stores absmax 0 and codes 0.
    """
    values = values.reshape(-1).to(torch.float32)
    m = values.numel()
    nblocks = -(-m // blocksize)
    # zero padding does not change a block's max |x|; padded codes are dropped below
    blocks = torch.nn.functional.pad(values, (0, nblocks * blocksize - m)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    nonzero = absmax > 0
    inv = torch.where(nonzero, torch.reciprocal(absmax), torch.zeros_like(absmax))
    v = torch.clamp(blocks * inv.unsqueeze(1), -1.0, 1.0)
    t = (v + 1.0) * 0.5
    # t is a multiple of 2**-25 in [0, 1], so t * 65535 + 0.5 is exact in float64: rounding it once to
    # fp32 reproduces the fused multiply-add of the bitsandbytes CPU kernel (needs float64 on the device).
    bins = (t.to(torch.float64) * (_LUT_SIZE - 1) + 0.5).to(torch.float32).to(torch.int64)
    q = _dynamic_lut(code.to(device=values.device, dtype=torch.float32))[bins]
    q = torch.where(nonzero.unsqueeze(1), q, torch.zeros_like(q))
    return q.reshape(-1)[:m], absmax


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    name: str | None = None,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize any-shape A (fp32/bf16/fp16) to packed 4-bit; `name` (e.g. a module path) labels errors.

    Returns `(packed uint8 [(n+1)//2, 1], QuantState)`, byte-identical to
    `bitsandbytes.functional.quantize_4bit(A, blocksize=..., compress_statistics=double_quant, quant_type=...)`.
    """
    code = get_code(quant_type)
    check_blocksize(blocksize)
    _check_input(A, name)
    device = A.device
    code = code.to(device=device, copy=True)
    packed, absmax = quantize_blocks(A.reshape(-1).to(torch.float32), code, blocksize)
    nested = None
    if double_quant:
        offset = absmax.mean()
        if not bool(torch.isfinite(offset)):
            raise QuantizationError(
                f"cannot double-quantize {_describe(A, name)}: the mean of its block absmax overflows float32 "
                f"(values up to {absmax.max().item():.3g}); quantize it with double_quant=False"
            )
        dyn = DYNAMIC_CODE.to(device=device, copy=True)
        absmax, absmax2 = quantize_dynamic_reference(absmax - offset, dyn, NESTED_BLOCKSIZE)
        nested = NestedState(
            absmax=absmax2, code=dyn, blocksize=NESTED_BLOCKSIZE, offset=float(offset.item())
        )
    state = QuantState(
        absmax=absmax,
        shape=A.shape,
        dtype=A.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=code,
        nested=nested,
    )
    return packed, state


def dequantize_4bit(
    packed: torch.Tensor, state: QuantState, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The tensor of `state.shape` and dtype `out_dtype or state.dtype` that `packed` encodes."""
    out_dtype = state.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES.values():
        raise QuantizationError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise QuantizationError(
            f"packed 4-bit weight must be a uint8 tensor, got {got} (view other storage with .view(torch.uint8))"
        )
    if packed.device != state.absmax.device:
        raise QuantizationError(
            f"packed weight is on {packed.device} but its QuantState on {state.absmax.device}: "
            "move both with .to(device) / state.to(device)"
        )
    absmax = state.real_absmax()
    flat = dequantize_blocks(packed, absmax, state.code, state.blocksize, state.numel, out_dtype)
    return flat.reshape(state.shape)


def bits_per_parameter(state: QuantState) -> float:
    """Storage bits per element from the real tensors: packed nibbles (with odd-count padding) + absmax
    (+ nested absmax). Per-tensor constants (code tables, offset) are not counted: they do not scale with n.

    Blocksize 64 gives 4 + 32/64 = 4.5 bits without and 4 + 8/64 + 32/(64*256) ~ 4.127 with double quant.
    """
    n = state.numel
    bits = 8 * ((n + 1) // 2) + 8 * state.absmax.numel() * state.absmax.element_size()
    if state.nested is not None:
        bits += 8 * state.nested.absmax.numel() * state.nested.absmax.element_size()
    return bits / n


__all__ = [
    "NESTED_BLOCKSIZE",
    "bits_per_parameter",
    "dequantize_4bit",
    "dequantize_blocks",
    "quantize_4bit",
    "quantize_blocks",
    "quantize_blocks_reference",
    "quantize_dynamic_reference",
]
