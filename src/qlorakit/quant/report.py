"""Quantization error statistics and the human-readable report of a whole-model quantization."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qlorakit.core.dtypes import format_bytes

# Elements compared at a time: keeps the fp32 temporaries of the error computation to a few MB.
_CHUNK = 1 << 18


@dataclass(frozen=True)
class ErrorStats:
    """Error of an approximation of a tensor: sum of squared errors, max |error|, element count."""

    sse: float
    max_abs: float
    numel: int

    @property
    def rmse(self) -> float:
        return math.sqrt(self.sse / self.numel) if self.numel else 0.0


def weight_error(original: torch.Tensor, approx: torch.Tensor) -> ErrorStats:
    """Error of `approx` against `original` (any shapes with equal numel), computed in fp32 chunks."""
    if original.numel() != approx.numel():
        raise ValueError(f"cannot compare tensors of {original.numel()} and {approx.numel()} elements")
    a, b = original.reshape(-1), approx.reshape(-1)
    sse, max_abs = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, a.numel(), _CHUNK):
            diff = a[start : start + _CHUNK].float() - b[start : start + _CHUNK].float()
            # norms reduce without materializing squares; the 2-norm accumulates in float64
            sse += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
            max_abs = max(max_abs, float(torch.linalg.vector_norm(diff, ord=math.inf)))
    return ErrorStats(sse=sse, max_abs=max_abs, numel=a.numel())


@dataclass(frozen=True)
class LayerReport:
    """One quantized weight. bytes_after counts every tensor the layer stores in a 4-bit checkpoint."""

    name: str
    shape: tuple[int, ...]
    rmse: float
    max_abs_err: float
    bytes_before: int
    bytes_after: int
    bits_per_parameter: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class QuantizeReport:
    """What `quantize_model` did: per-layer errors and sizes, and whole-model sizes before/after."""

    layers: tuple[LayerReport, ...]
    skipped: tuple[tuple[str, str], ...]  # (module name, reason)
    quant_type: str
    blocksize: int
    double_quant: bool
    compute_dtype: torch.dtype
    model_bytes_before: int
    model_bytes_after: int
    seconds: float = field(default=0.0, compare=False)

    @property
    def params_quantized(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def bytes_before(self) -> int:
        """Bytes of the quantized layers' weights before quantization."""
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def bits_per_parameter(self) -> float:
        """Storage bits per quantized weight element (nibbles + absmax + nested absmax)."""
        n = self.params_quantized
        return sum(layer.bits_per_parameter * layer.numel for layer in self.layers) / n if n else 0.0

    @property
    def rmse(self) -> float:
        """Root mean squared error over all quantized elements (element-weighted)."""
        n = self.params_quantized
        return math.sqrt(sum(layer.rmse**2 * layer.numel for layer in self.layers) / n) if n else 0.0

    @property
    def max_abs_err(self) -> float:
        return max((layer.max_abs_err for layer in self.layers), default=0.0)


def _layer_rows(layers: Sequence[LayerReport], max_rows: int) -> list[str]:
    header = f"  {'layer':<48} {'shape':>13} {'rmse':>10} {'max|err|':>10} {'bits/param':>10}"
    rows = [header]
    shown = (
        layers if len(layers) <= max_rows else sorted(layers, key=lambda r: r.rmse, reverse=True)[:max_rows]
    )
    for layer in shown:
        shape = "x".join(str(d) for d in layer.shape)
        rows.append(
            f"  {layer.name[-48:]:<48} {shape:>13} {layer.rmse:>10.3e} {layer.max_abs_err:>10.3e} "
            f"{layer.bits_per_parameter:>10.3f}"
        )
    if len(layers) > max_rows:
        rows.append(
            f"  ... {len(layers) - max_rows} more layers (showing the {max_rows} with the largest rmse)"
        )
    return rows


def format_report(
    report: QuantizeReport,
    *,
    perplexity_before: float | None = None,
    perplexity_after: float | None = None,
    max_rows: int = 12,
) -> str:
    """The report printed by `qlorakit quantize`: sizes, bits/param, per-layer and overall errors, perplexity."""
    ratio = report.model_bytes_before / report.model_bytes_after if report.model_bytes_after else float("nan")
    dq = "double-quant" if report.double_quant else "no double-quant"
    lines = [
        f"Quantized {len(report.layers)} linear layers ({report.params_quantized:,} parameters) to "
        f"{report.quant_type.upper()} 4-bit, blocksize {report.blocksize}, {dq}, "
        f"compute dtype {str(report.compute_dtype).removeprefix('torch.')} in {report.seconds:.1f} s",
        f"  model size: {format_bytes(report.model_bytes_before)} -> {format_bytes(report.model_bytes_after)} "
        f"({ratio:.2f}x smaller)",
        f"  quantized layers: {format_bytes(report.bytes_before)} -> {format_bytes(report.bytes_after)}, "
        f"{report.bits_per_parameter:.3f} bits per parameter",
        f"  overall weight error: rmse {report.rmse:.3e}, max |err| {report.max_abs_err:.3e}",
    ]
    if report.skipped:
        kept = ", ".join(f"{name} ({why})" for name, why in report.skipped)
        lines.append(f"  kept in full precision: {kept}")
    lines.extend(_layer_rows(report.layers, max_rows))
    if perplexity_before is not None and perplexity_after is not None:
        change = (perplexity_after / perplexity_before - 1) * 100
        lines.append(
            f"  perplexity (built-in text): {perplexity_before:.3f} before -> {perplexity_after:.3f} after "
            f"({change:+.2f}%)"
        )
    return "\n".join(lines)
