"""What a whole-model 4-bit quantization needs to know: quant's own settings type and the blocksize rule.

`quant/` sits below the application's configuration: it never reads `qlorakit.config`. The `quant`
section of a training config turns into these settings with `QuantConfig.to_settings(compute_dtype)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlorakit.core.errors import QuantizationError
from qlorakit.quant.codes import get_code

# bitsandbytes' 4-bit blocksizes: a power of two from 32 to 4096 (one absmax per block)
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def blocksize_problem(blocksize: object) -> str | None:
    """None for a valid 4-bit blocksize, else what is wrong with it (callers name the key and value)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        return "must be a power of two in 32..4096"
    return None


def check_blocksize(blocksize: int) -> int:
    """`blocksize` if it is a power of two in [32, 4096], else QuantizationError."""
    if blocksize_problem(blocksize) is not None:
        raise QuantizationError(
            f"invalid blocksize {blocksize!r}: use a power of two from 32 to 4096 ({', '.join(map(str, BLOCKSIZES))})"
        )
    return blocksize


@dataclass(frozen=True)
class QuantSettings:
    """How `quantize_model` / `load_quantizing` turn linear layers into 4-bit ones.

    skip: module names (an exact path or a name suffix such as "lm_head" or "mlp.down_proj") kept in full
    precision; compute_dtype: the dtype of the 4-bit layers' matmuls, None for the best the device of each
    layer computes natively.
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    skip: tuple[str, ...] = ("lm_head",)
    compute_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if isinstance(self.skip, str):
            raise QuantizationError(f"skip must be a sequence of module names, got the string {self.skip!r}")
        get_code(self.quant_type)  # QuantizationError naming the known types
        check_blocksize(self.blocksize)
        object.__setattr__(self, "skip", tuple(self.skip))


__all__ = ["BLOCKSIZES", "QuantSettings", "blocksize_problem", "check_blocksize"]
