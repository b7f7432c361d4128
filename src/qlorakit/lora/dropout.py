"""LoRA dropout with a counter-based, bit-packed keep-mask.

The mask of n elements is a pure function of a 64-bit seed: element e is kept when the 32-bit half
`e % 2` of `splitmix64(seed + (e // 2 + 1) * golden)` is >= `round(p * 2**32)`. Bit `e % 8` of byte `e // 8`
of a uint8 [ceil(n / 8)] tensor stores it. Why not `torch.bernoulli_`:
- speed: torch draws one Mersenne-Twister sample per element (~40 ms for 1024 x 4096 on two CPU cores, as
  much as the rest of a rank-16 LoRA branch); one hash per two elements vectorizes and takes ~1 ms;
- memory: autograd keeps 1 bit per input element instead of a 1-byte bool mask (or PEFT's fp32 copies);
- reproducibility: the seed is drawn from torch's default CPU generator, so `torch.manual_seed`, the RNG
  state a checkpoint restores and gradient checkpointing's recomputation (which replays that generator)
  all reproduce the same masks, on every device: the plain-torch reference below gives the C++ kernel's
  masks bit for bit, and is what non-CPU tensors (or machines without a compiler) use.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from qlorakit.core import native
from qlorakit.quant import kernels

SOURCE = native.register(
    Path(__file__).parent / "csrc" / "dropout_cpu.cpp",
    {
        "qlk_dropout_mask": (
            ctypes.c_int,
            [ctypes.c_uint64, ctypes.c_int64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int64],
        ),
        "qlk_dropout_apply": (
            ctypes.c_int,
            [
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_void_p,
                ctypes.c_int64,
            ],
        ),
    },
)

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def _signed(v: int) -> int:
    """A uint64 as the int64 with the same bits (torch has no full uint64 arithmetic)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 values seen as uint64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def threshold(p: float) -> int:
    """The uint32 a draw must reach to be kept: round(p * 2^32), so P(drop) = p to within 2^-32."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(round(p * 2**32), 2**32 - 1)


def draw_seed() -> int:
    """A fresh 64-bit mask seed from torch's default CPU generator (follows torch.manual_seed/get_rng_state)."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) & ((1 << 64) - 1)


def keep_mask_reference(seed: int, n: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep-mask in plain torch: bool [n] (True = kept). int64 products wrap like uint64 ones."""
    k = torch.arange(1, (n + 1) // 2 + 1, dtype=torch.int64, device=device)
    z = k * _signed(_GOLDEN) + _signed(seed)
    z = (z ^ _shift_right(z, 30)) * _signed(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _signed(_MIX2)
    z = z ^ _shift_right(z, 31)
    halves = torch.stack([z & 0xFFFFFFFF, _shift_right(z, 32)], dim=1).flatten()[:n]
    return halves >= threshold(p)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """bool [n] -> uint8 [ceil(n / 8)], element e at bit e % 8 of byte e // 8 (padding bits are 0)."""
    n = keep.numel()
    padded = F.pad(keep.reshape(-1).to(torch.uint8), (0, (-n) % 8)).view(-1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=keep.device)
    return (padded * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [ceil(n / 8)] -> bool [n], the inverse of `pack_bits`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).flatten()[:n].bool()


def _fast(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.element_size() in (2, 4) and native.available(SOURCE)


def keep_bits(seed: int, n: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The packed keep-mask of n elements: uint8 [ceil(n / 8)] on `device`."""
    device = torch.device(device)
    if device.type == "cpu" and native.available(SOURCE):
        bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
        if n and native.library(SOURCE).qlk_dropout_mask(
            seed, n, threshold(p), bits.data_ptr(), kernels.best_isa()
        ):
            raise RuntimeError("the C++ dropout-mask kernel failed in a worker thread")
        return bits
    return pack_bits(keep_mask_reference(seed, n, p, device))


def apply_keep(x: torch.Tensor, bits: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """`x` with dropped elements zeroed (no 1 / (1 - p) scaling): x [...] contiguous, bits from `keep_bits`."""
    if not x.is_contiguous():
        raise ValueError("apply_keep needs a contiguous tensor; the mask indexes its flat elements")
    out = x if inplace else torch.empty_like(x)
    if _fast(x):
        rc = native.library(SOURCE).qlk_dropout_apply(
            x.data_ptr(), bits.data_ptr(), x.numel(), x.element_size(), out.data_ptr(), kernels.best_isa()
        )
        if rc:
            raise RuntimeError("the C++ dropout-apply kernel failed")
        return out
    keep = unpack_bits(bits, x.numel()).view(x.shape)
    return torch.mul(x, keep, out=out) if inplace else x * keep


class _DropoutProject(torch.autograd.Function):
    """`dropout(x, p) @ A^T`: autograd saves x (alive anyway: the base layer's and sibling adapters' input),
    the 1-bit mask and A; backward re-applies the mask instead of keeping a dropped copy. The 1 / (1 - p)
    scale is applied to the [..., r] side, never to an input-sized tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        bits = keep_bits(draw_seed(), x.numel(), p, x.device)
        h = F.linear(apply_keep(x, bits), weight).mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(x, bits, weight)
        ctx.scale = 1.0 / (1.0 - p)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):  # type: ignore[override]
        x, bits, weight = ctx.saved_tensors
        g = grad_h * ctx.scale  # [..., r]: scaling here is free
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = apply_keep((g @ weight.to(g.dtype)).contiguous(), bits, inplace=True)
        if ctx.needs_input_grad[1]:
            dropped = apply_keep(x, bits).reshape(-1, x.shape[-1])
            grad_w = (g.reshape(-1, g.shape[-1]).t() @ dropped.to(g.dtype)).to(weight.dtype)
        return grad_x, grad_w, None


class _Dropout(torch.autograd.Function):
    """`dropout(x, p)` saving only the 1-bit mask (DoRA needs the dropped input itself)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        bits = keep_bits(draw_seed(), x.numel(), p, x.device)
        ctx.save_for_backward(bits)
        ctx.scale = 1.0 / (1.0 - p)
        return apply_keep(x, bits).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (bits,) = ctx.saved_tensors
        return apply_keep((grad * ctx.scale).contiguous(), bits, inplace=True), None


def dropout_project(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """`dropout(x, p) @ weight^T`: x [..., in], weight [r, in] -> [..., r] (p in (0, 1))."""
    return _DropoutProject.apply(x, weight, p)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with the counter-based mask: x [...] -> [...] (p in (0, 1))."""
    return _Dropout.apply(x, p)


__all__ = [
    "apply_keep",
    "draw_seed",
    "dropout",
    "dropout_project",
    "keep_bits",
    "keep_mask_reference",
    "pack_bits",
    "threshold",
    "unpack_bits",
]
