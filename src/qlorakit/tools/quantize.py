"""The `quantize` pipeline: load a 16-bit model, measure, quantize to 4 bits, measure again, save the folder.

It sits above quant, models and eval because it uses all three: quant converts and saves, models loads,
eval measures the perplexity before and after. The folder is what transformers + bitsandbytes write for a
4-bit model (see `qlorakit.quant.convert.save_quantized`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qlorakit.config import QuantConfig
from qlorakit.core.errors import ConfigError
from qlorakit.core.outputs import OutputPlan
from qlorakit.eval.perplexity import builtin_eval_text, perplexity
from qlorakit.models.load import resolve_compute_dtype
from qlorakit.models.resolve import is_quantized_folder, load_model, resolve_model_path
from qlorakit.quant.convert import quantize_model, save_quantized
from qlorakit.quant.report import format_bytes, format_report


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@dataclass(frozen=True)
class QuantizeJob:
    """What `qlorakit quantize` does: the validated options (the output checked before anything loads)."""

    model: str
    plan: OutputPlan
    quant: QuantConfig
    perplexity: bool = True
    """Measure the perplexity before and after quantizing."""
    max_length: int = 256
    max_shard_size: str = "5GB"


@torch.no_grad()
def quantize_folder(job: QuantizeJob) -> str:
    """Load `job.model`, quantize it with `job.quant`, save the 4-bit folder at `job.plan.path` (checked by
    the caller before anything is loaded); returns the report text (sizes, errors, perplexity before/after)."""
    model_spec, plan, quant = job.model, job.plan, job.quant
    measure_perplexity, max_length, max_shard_size = job.perplexity, job.max_length, job.max_shard_size
    out = plan.path
    source = resolve_model_path(model_spec)
    if source.is_dir() and is_quantized_folder(source):
        raise ConfigError(f"{source} is already a 4-bit folder; quantize the original (16-bit) model instead")
    started = time.perf_counter()
    model, tokenizer = load_model(model_spec, dtype="auto")
    load_seconds = time.perf_counter() - started
    text = builtin_eval_text()
    before = perplexity(model, tokenizer, text, max_length=max_length) if measure_perplexity else None
    report = quantize_model(model, quant.to_settings(resolve_compute_dtype(quant.compute_dtype, "cpu")))
    after = perplexity(model, tokenizer, text, max_length=max_length) if measure_perplexity else None
    save_quantized(model, tokenizer, out, max_shard_size=max_shard_size, plan=plan)
    lines = [
        f"Loaded {model_spec} ({source}) in {load_seconds:.1f} s",
        format_report(
            report,
            perplexity_before=None if before is None else before.perplexity,
            perplexity_after=None if after is None else after.perplexity,
        ),
    ]
    if before is not None:
        lines.append(f"  perplexity measured on {before.tokens} tokens, windows of {max_length}")
    lines.append(f"Wrote {out} ({format_bytes(_folder_bytes(out))} of weights)")
    return "\n".join(lines)


__all__ = ["quantize_folder"]
