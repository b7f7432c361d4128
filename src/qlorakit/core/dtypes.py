"""The one table of float dtypes and their names, and the one reader and writer of byte sizes.

Every name a user, a config or a checkpoint may give a float dtype maps to one canonical name
("float32", "bfloat16", "float16") and one `torch.dtype`: configs say `bfloat16`, the export commands say
`bf16`, checkpoints' `config.json` say `torch_dtype: "float16"`; all of them go through `parse_dtype`.

Sizes: `parse_size` reads "8GiB", "16GB", "1.5G" or 1234; `format_bytes` writes binary units.
"""

from __future__ import annotations

import math
import re

import torch

from qlorakit.core.errors import ConfigError

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Canonical name -> torch dtype of every float dtype qlorakit computes or stores in."""

_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
}  # fmt: skip
_NAMES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}
FLOAT_DTYPE_NAMES = frozenset(_ALIASES)
"""Every name `dtype_name` reads (lower case, without a `torch.` prefix)."""


def dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name ("float32", "bfloat16", "float16") of a dtype name, alias or `torch.dtype`."""
    if isinstance(dtype, torch.dtype):
        name = _NAMES.get(dtype)
    else:
        name = _ALIASES.get(str(dtype).strip().removeprefix("torch.").lower())
    if name is None:
        raise ConfigError(
            f"unknown float dtype {dtype!r}; use one of bf16, fp16, fp32 (or bfloat16, float16, float32)"
        )
    return name


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"bf16"`, `"bfloat16"`, `"torch.bfloat16"`, `torch.bfloat16`, ... -> the torch dtype (ConfigError else)."""
    return FLOAT_DTYPES[dtype_name(dtype)]


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of a float dtype given as a name ("bfloat16", "fp32") or a `torch.dtype`."""
    return parse_dtype(dtype).itemsize


KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
# A bare K/M/G/T is binary, as memory sizes are usually meant ("1.5G" = 1.5 GiB); KB/MB/GB/TB are decimal and
# KiB/MiB/GiB/TiB binary, as in transformers' `max_shard_size`.
_UNITS = {"": 1, "b": 1, "k": KiB, "kb": 10**3, "kib": KiB, "m": MiB, "mb": 10**6, "mib": MiB,
          "g": GiB, "gb": 10**9, "gib": GiB, "t": TiB, "tb": 10**12, "tib": TiB}  # fmt: skip
_SIZE = re.compile(r"((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)([a-z]*)")


def parse_size(size: int | str, what: str = "size") -> int:
    """Bytes from "8GiB", "16GB", "512 MiB", "1.5G" (G = GiB), "100000" or an int; must be positive.

    `what` names the value in the error ("max shard size", "memory budget").
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.fullmatch(str(size).strip().lower().replace(" ", ""))
        unit = match.group(2) if match else None
        number = float(match.group(1)) * _UNITS[unit] if unit in _UNITS else -1.0
        value = int(number) if math.isfinite(number) else -1
    if value <= 0:
        raise ConfigError(
            f"cannot read {what} {size!r}; expected a positive number of bytes with an optional unit, such as 8GiB, 16GB, "
            "512MiB or 100000 (a bare K, M, G or T is binary: 1.5G = 1.5 GiB)"
        )
    return value


def format_bytes(n: int) -> str:
    """Binary units with three significant figures: 1.50 GiB, 312 MiB, 4.00 KiB, 512 B."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.2f} {unit}"
    return f"{n} B"
