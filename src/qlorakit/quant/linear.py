"""A frozen 4-bit linear layer (NF4/FP4 + double quantization) with a memory-lean custom autograd Function.

y = x @ W^T + b, where W [out, in] is dequantized from its packed 4-bit form on every call, in row chunks,
straight into the compute dtype. Nothing [out, in]-sized is kept: backward re-dequantizes W (in column
chunks) to form grad_input = grad_output @ W. W never receives a gradient; the bias may (if unfrozen).
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch
from torch import nn

from qlorakit.core.errors import QuantizationError
from qlorakit.quant.blockwise import dequantize_4bit, dequantize_blocks, quantize_4bit
from qlorakit.quant.state import NestedState, QuantState

COMPUTE_DTYPES = (torch.bfloat16, torch.float32, torch.float16)
# Elements of W dequantized at a time: the transient chunk stays a few MB (cache friendly, and small enough
# for the allocator to reuse memory instead of mapping fresh pages on every call).
CHUNK_ELEMENTS = 1 << 21


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 where `device` computes it natively (CUDA with bf16; CPUs with AVX512-BF16/AMX), else float32.

    On CPUs without native bf16 a bf16 matmul is several times slower than fp32, so fp32 is the default there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


#: Environment override of the CPU detection: "1" treats the CPU as computing bf16 natively, "0" as not.
#: It changes only what `compute_dtype: auto` resolves to (bf16 vs fp32), never which instructions run, so
#: one machine can exercise both resolutions (CI runs the dtype-sensitive tests under both).
CPU_BF16_ENV = "QLORAKIT_CPU_BF16"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16).

    oneDNN reports bf16 "support" on any AVX-512 CPU, but without these instructions it emulates bf16 and a
    bf16 matmul runs ~4x slower than fp32 (measured: 870 ms vs 217 ms for 1024x4096 @ 4096x4096), so the
    instruction flags are what decide. Off Linux, fall back to torch's CPU capability string.
    `QLORAKIT_CPU_BF16=0|1` overrides the detection (read once per process).
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if forced:
        raise QuantizationError(
            f"{CPU_BF16_ENV}={forced!r}: use 1 (native bf16) or 0 (no native bf16), or unset it"
        )
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return "AMX" in torch.backends.cpu.get_cpu_capability()


def check_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """`dtype` if it is a usable compute dtype (fp16 with a warning), else QuantizationError."""
    if dtype not in COMPUTE_DTYPES:
        raise QuantizationError(
            f"compute_dtype must be torch.bfloat16 or torch.float32 (or float16), got {dtype}"
        )
    if dtype == torch.float16:
        warnings.warn(
            "float16 compute for 4-bit layers is numerically unstable in training (QLoRA); prefer bfloat16, "
            "or float32 on CPUs without native bf16",
            UserWarning,
            stacklevel=3,
        )
    return dtype


def _row_step(state: QuantState) -> int:
    """Smallest number of rows whose element count is a whole number of blocks (block and byte aligned)."""
    in_features = state.shape[-1]
    return state.blocksize // math.gcd(in_features, state.blocksize)


def _dequantize_rows(
    packed: torch.Tensor, absmax: torch.Tensor, state: QuantState, r0: int, r1: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rows [r0, r1) of W as [r1 - r0, in] in `dtype`; r0 * in must be a multiple of the blocksize."""
    in_features, bs = state.shape[-1], state.blocksize
    e0, e1 = r0 * in_features, min(r1 * in_features, state.numel)
    flat = packed.reshape(-1)[e0 // 2 : (e1 + 1) // 2]
    scales = absmax[e0 // bs : -(-e1 // bs)]
    return dequantize_blocks(flat, scales, state.code, bs, e1 - e0, dtype).view(-1, in_features)


def _dequantize_cols(
    packed: torch.Tensor, absmax: torch.Tensor, state: QuantState, c0: int, c1: int, dtype: torch.dtype
) -> torch.Tensor:
    """Columns [c0, c1) of W as [out, c1 - c0] in `dtype`; in, c0 and c1 must be multiples of the blocksize."""
    out_features, in_features, bs = state.numel // state.shape[-1], state.shape[-1], state.blocksize
    flat = packed.reshape(out_features, in_features // 2)[:, c0 // 2 : c1 // 2].contiguous()
    scales = absmax.view(out_features, in_features // bs)[:, c0 // bs : c1 // bs].contiguous()
    return dequantize_blocks(flat, scales.view(-1), state.code, bs, flat.numel() * 2, dtype).view(
        out_features, -1
    )


def linear4bit_forward(
    x2d: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """x2d [tokens, in] (dtype) -> x2d @ W^T + bias, [tokens, out] in `dtype`, dequantizing W by row chunks."""
    out_features, in_features = state.numel // state.shape[-1], state.shape[-1]
    absmax = state.real_absmax()
    y = torch.empty(x2d.shape[0], out_features, dtype=dtype, device=x2d.device)
    step = _row_step(state)
    rows = max(step, CHUNK_ELEMENTS // in_features // step * step)
    b = None if bias is None else bias.to(dtype)
    for r0 in range(0, out_features, rows):
        r1 = min(r0 + rows, out_features)
        w = _dequantize_rows(packed, absmax, state, r0, r1, dtype)
        if b is None:
            torch.mm(x2d, w.t(), out=y[:, r0:r1])
        else:
            torch.addmm(b[r0:r1], x2d, w.t(), out=y[:, r0:r1])
    return y


def linear4bit_grad_input(
    g2d: torch.Tensor, packed: torch.Tensor, state: QuantState, dtype: torch.dtype
) -> torch.Tensor:
    """g2d [tokens, out] (dtype) -> g2d @ W, [tokens, in] in `dtype`, dequantizing W again by column chunks.

    Column chunks keep every dot product over the full `out` dimension in one matmul (no partial sums are
    rounded to a 16-bit dtype); they need `in` to be a multiple of the blocksize, else W is done at once.
    """
    out_features, in_features, bs = state.numel // state.shape[-1], state.shape[-1], state.blocksize
    absmax = state.real_absmax()
    if in_features % bs:
        return g2d @ _dequantize_rows(packed, absmax, state, 0, out_features, dtype)
    gx = torch.empty(g2d.shape[0], in_features, dtype=dtype, device=g2d.device)
    cols = max(bs, CHUNK_ELEMENTS // out_features // bs * bs)
    for c0 in range(0, in_features, cols):
        c1 = min(c0 + cols, in_features)
        torch.mm(g2d, _dequantize_cols(packed, absmax, state, c0, c1, dtype), out=gx[:, c0:c1])
    return gx


class _Linear4bitFunction(torch.autograd.Function):
    """Saves only the packed weight (a buffer that exists anyway); W is re-dequantized in backward."""

    @staticmethod
    def forward(ctx, x, packed, bias, state, dtype):  # type: ignore[override]
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)
        y = linear4bit_forward(x2d, packed, state, bias, dtype)
        ctx.save_for_backward(packed)
        ctx.state, ctx.dtype, ctx.x_dtype = state, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        g2d = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            gx = linear4bit_grad_input(g2d, packed, ctx.state, ctx.dtype)
            grad_x = gx.view(*grad_out.shape[:-1], gx.shape[-1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = g2d.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None, None


def linear4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """x [..., in] -> [..., out]: x @ dequantize(packed, state)^T + bias.

    Computes in `compute_dtype` and returns x.dtype; under torch.autocast it computes and returns the autocast
    dtype, like nn.Linear. With no gradient needed it skips the autograd Function (same arithmetic).
    """
    dtype, out_dtype = compute_dtype, x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = out_dtype = torch.get_autocast_dtype(x.device.type)
    with torch.autocast(x.device.type, enabled=False):
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad)
        )
        if needs_grad:
            y = _Linear4bitFunction.apply(x, packed, bias, state, dtype)
        else:
            y2d = linear4bit_forward(x.reshape(-1, x.shape[-1]).to(dtype), packed, state, bias, dtype)
            y = y2d.view(*x.shape[:-1], y2d.shape[-1])
        return y.to(out_dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 values stored as their int32 bit patterns: `.to(dtype)`/`.half()` leave integer buffers alone."""
    return t.detach().to(torch.float32).contiguous().view(torch.int32).clone()


class Linear4bit(nn.Module):
    """A frozen 4-bit linear layer: `forward(x [..., in]) -> [..., out]`.

    Buffers (moved by `.to(device)`, saved in `state_dict`): `weight` packed uint8 [(out*in+1)//2, 1];
    `absmax` (uint8 codes with double quantization, else fp32); `quant_map` fp32 [16]; with double
    quantization `nested_absmax` fp32, `nested_quant_map` fp32 [256] and `nested_offset` fp32 [].
    The fp32 state is stored as int32 bit patterns so that `model.to(torch.bfloat16)` or `.half()`
    cannot round it; `quant_state` views them back. `bias` is a frozen nn.Parameter or None.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        state: QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        if len(state.shape) != 2:
            raise QuantizationError(
                f"Linear4bit needs a 2-D [out, in] weight, got shape {tuple(state.shape)}"
            )
        if packed.dtype != torch.uint8 or packed.numel() != (state.numel + 1) // 2:
            raise QuantizationError(
                f"packed weight must be uint8 with {(state.numel + 1) // 2} bytes for shape {tuple(state.shape)}, "
                f"got {packed.dtype} {list(packed.shape)}"
            )
        out_features, in_features = state.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise QuantizationError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        self._compute_dtype = check_compute_dtype(compute_dtype)
        self._shape, self._dtype = state.shape, state.dtype
        self._blocksize, self._quant_type = state.blocksize, state.quant_type
        self._nested_blocksize = None if state.nested is None else state.nested.blocksize
        self.register_buffer("weight", packed.detach().reshape(-1, 1).contiguous())
        absmax = state.absmax if state.nested is not None else _bits(state.absmax)
        self.register_buffer("absmax", absmax.detach().clone())
        self.register_buffer("quant_map", _bits(state.code))
        nested = state.nested
        self.register_buffer("nested_absmax", None if nested is None else _bits(nested.absmax))
        self.register_buffer("nested_quant_map", None if nested is None else _bits(nested.code))
        offset = None if nested is None else _bits(torch.tensor(nested.offset, dtype=torch.float32))
        self.register_buffer("nested_offset", offset)
        self._offset = None if nested is None else nested.offset
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # the Python copy of the offset avoids a device sync per call; refresh it when a state_dict is loaded
        self.register_load_state_dict_post_hook(_refresh_offset)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        blocksize: int = 64,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> Linear4bit:
        """Quantize `linear.weight` (on its device); the bias is copied and frozen."""
        with torch.no_grad():
            packed, state = quantize_4bit(linear.weight.detach(), blocksize, quant_type, double_quant)
        return cls(packed, state, linear.bias, compute_dtype)

    @property
    def in_features(self) -> int:
        return self._shape[1]

    @property
    def out_features(self) -> int:
        return self._shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    @property
    def packed(self) -> torch.Tensor:
        """The packed 4-bit weight, uint8 [(out * in + 1) // 2, 1]."""
        return self.weight

    @property
    def quant_state(self) -> QuantState:
        """The QuantState of the current buffers (on their device)."""
        nested = None
        if self.nested_absmax is not None:
            nested = NestedState(
                absmax=self.nested_absmax.view(torch.float32),
                code=self.nested_quant_map.view(torch.float32),
                blocksize=self._nested_blocksize,
                offset=self._offset,
            )
        absmax = self.absmax if nested is not None else self.absmax.view(torch.float32)
        return QuantState(
            absmax=absmax,
            shape=self._shape,
            dtype=self._dtype,
            blocksize=self._blocksize,
            quant_type=self._quant_type,
            code=self.quant_map.view(torch.float32),
            nested=nested,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight [out, in] in `dtype` (default: the dtype it was quantized from)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise QuantizationError(
                f"Linear4bit expects inputs [..., {self.in_features}], got shape {tuple(x.shape)}"
            )
        return linear4bit(x, self.weight, self.quant_state, self.bias, self._compute_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self._quant_type}, blocksize={self._blocksize}, "
            f"double_quant={self.nested_absmax is not None}, compute_dtype={self._compute_dtype}"
        )


def _refresh_offset(module: Linear4bit, incompatible_keys: object) -> None:
    if module.nested_offset is not None:
        module._offset = float(module.nested_offset.view(torch.float32).item())


__all__ = ["CHUNK_ELEMENTS", "Linear4bit", "default_compute_dtype", "linear4bit"]
