"""Code tables of the 4-bit data types (NF4, FP4) and the 8-bit dynamic map of double quantization.

All tables are fp32 CPU tensors, bit-identical to the ones bitsandbytes uses; move them with `.to(device)`.
"""

from __future__ import annotations

import torch

from qlorakit.core.errors import QuantizationError

# NF4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA). Hard-coded: regenerating the table from the
# normal quantiles differs from the bitsandbytes values in the last ulp.
NF4_CODE: torch.Tensor = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# FP4 (E2M1 with exponent bias 2) in bit-pattern order: bit 3 is the sign, the three low bits select
# 0, 0.0625, 8, 12, 4, 6, 2, 3. The table is divided by its largest magnitude (12) in fp32, exactly as
# bitsandbytes does; pattern 8 ("-0") is stored as +0.0 there too.
_FP4_PATTERNS = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
FP4_CODE: torch.Tensor = torch.tensor(
    _FP4_PATTERNS + [0.0] + [-v for v in _FP4_PATTERNS[1:]], dtype=torch.float32
)
FP4_CODE = FP4_CODE / FP4_CODE.abs().max()

_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
QUANT_TYPES: tuple[str, ...] = tuple(_CODES)


def get_code(quant_type: str) -> torch.Tensor:
    """The fp32 [16] code table of `quant_type` ("nf4" or "fp4"); index = the 4-bit value."""
    if not isinstance(quant_type, str) or quant_type not in _CODES:
        raise QuantizationError(f"unknown quant_type {quant_type!r}: use one of {', '.join(QUANT_TYPES)}")
    return _CODES[quant_type]


def quantize_bounds(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision boundaries of nearest-value quantization onto a 16-entry `code`.

    Returns `(bounds fp32 [15], order int64 [16])`: `order` sorts the code ascending (stable, so of two
    equal entries the lower index comes first, as in bitsandbytes), and `bounds[i]` is the midpoint
    `(sorted[i] + sorted[i + 1]) / 2` computed in fp32. A value x maps to `order[#{i : x > bounds[i]}]`.
    """
    code = code.to(torch.float32)
    order = torch.argsort(code, stable=True)
    ordered = code[order]
    return (ordered[:-1] + ordered[1:]) / 2, order


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The bitsandbytes dynamic 8-bit map (`create_dynamic_map`), fp32 [256], sorted ascending.

    Seven exponent ranges: for i in 0..6, the midpoints of `linspace(0.1, 1, 2**i + 1)` (fp32; `2**(i+1)+1`
    points when unsigned) scaled by 10**(i - 6), with their negatives when signed; plus 0 and 1.0.
    """
    values: list[float] = []
    for i in range(7):
        points = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, points, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        # the scale multiplies in fp32 (tensor * Python scalar), as in bitsandbytes
        scale = 10 ** (i - 6)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    values += [0.0, 1.0]
    if len(values) != 256:  # an internal invariant of the construction above
        raise AssertionError(f"dynamic map has {len(values)} entries, expected 256")
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


DYNAMIC_CODE: torch.Tensor = dynamic_map(signed=True)
