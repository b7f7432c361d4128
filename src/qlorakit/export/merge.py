"""Merge a LoRA adapter into a dense 16-bit checkpoint, one layer at a time.

The adapter was trained against the *dequantized* 4-bit weights, so the faithful merge (default,
`base="nf4"`) is `W' = dequant(W_nf4) + s * B @ A`; `base="original"` merges into the original 16-bit
weights instead (what the adapter never saw, but the higher-precision base). DoRA rescales each output row
as PEFT's merge does: `W' = (m / ||W + s B A||_row) * (W + s B A)`.

The pipeline never builds a second full copy of the model: each layer is dequantized, merged, cast and
handed to the shard writer, which writes a shard to disk as soon as it is full.
"""

from __future__ import annotations

import gc
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlorakit.config import QuantConfig
from qlorakit.core.atomic import make_temp_dir
from qlorakit.core.dtypes import parse_dtype, parse_size
from qlorakit.core.errors import CheckpointError, ConfigError
from qlorakit.core.outputs import OutputPlan, check_output, output_folder
from qlorakit.export.hf import dense_tensors, write_hf_files
from qlorakit.lora.inject import lora_layers
from qlorakit.methods import check_adapter, load_adapter
from qlorakit.models.load import adapter_quant_config, load_base, resolve_compute_dtype
from qlorakit.models.resolve import is_quantized_folder, resolve_model_path
from qlorakit.models.shape import estimated_bytes
from qlorakit.quant.convert import quantize_model, save_quantized
from qlorakit.quant.loading import load_quantized

BASES = ("nf4", "original")
TARGETS = ("bf16", "fp16", "fp32", "nf4")

# ---------------------------------------------------------------------------------------------------------
# Drift reports


def logit_drift(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(max, mean) absolute difference of two logit tensors [B, T, V], computed in fp32."""
    diff = (reference.float() - other.float()).abs()
    return float(diff.max()), float(diff.mean())


# ---------------------------------------------------------------------------------------------------------
# Drift inputs and logits


def sample_inputs(tokenizer: Any, vocab_size: int, *, batch: int = 2, length: int = 32) -> torch.Tensor:
    """Fixed inputs [batch, length] for drift reports: a real sentence, then seeded random ids."""
    text = "Below is an instruction that describes a task. Write a response that completes the request. " * 4
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    gen = torch.Generator().manual_seed(1234)
    rows = torch.randint(0, vocab_size, (batch, length), generator=gen)
    if len(ids) == length:
        rows[0] = torch.tensor(ids)
    return rows


@torch.no_grad()
def model_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] in fp32 on the CPU."""
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device)).logits.float().cpu()


# ---------------------------------------------------------------------------------------------------------
# The pipeline


class RssMeter:
    """Peak resident memory growth while a generator is consumed (psutil when installed, else None)."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            self._process = None
        else:
            self._process = psutil.Process()
        self.start = self._rss()
        self.peak = self.start

    def _rss(self) -> int | None:
        return None if self._process is None else int(self._process.memory_info().rss)

    def sample(self) -> None:
        rss = self._rss()
        if rss is not None and self.peak is not None:
            self.peak = max(self.peak, rss)

    @property
    def growth(self) -> int | None:
        return None if self.start is None or self.peak is None else self.peak - self.start

    def wrap(self, items: Iterator[Any]) -> Iterator[Any]:
        for item in items:
            self.sample()
            yield item
        self.sample()


@dataclass
class MergeReport:
    out_dir: Path
    base: str
    to: str
    merged_layers: int
    files: list[str]
    dense_bytes: int
    """Bytes of the merged dense weights as written (in `to`'s dtype; fp32 before re-quantizing to nf4)."""
    params: int
    peak_buffer_bytes: int
    """Most merged-weight bytes held in memory at once (the pending shard)."""
    peak_rss_growth: int | None
    """Resident memory growth of the process during the merge pass (None without psutil)."""
    drift_max: float
    """Max |logits(merged) - logits(adapter on the 4-bit base)| on the sample inputs."""
    drift_mean: float
    source_drift_max: float
    """The same against the adapter on the base that was merged into (equal to drift for base=nf4)."""
    source_drift_mean: float
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rss = "n/a" if self.peak_rss_growth is None else f"{self.peak_rss_growth / 2**20:.1f} MiB"
        lines = [
            f"merged {self.merged_layers} LoRA layers into the {self.base} base -> {self.out_dir} ({self.to})",
            f"  files: {', '.join(self.files)}",
            f"  params: {self.params:,}; dense weights: {self.dense_bytes / 2**20:.1f} MiB; "
            f"peak merge buffer: {self.peak_buffer_bytes / 2**20:.1f} MiB; peak RSS growth: {rss}",
            f"  logit drift vs adapter on the 4-bit base: max {self.drift_max:.3g}, mean {self.drift_mean:.3g}",
        ]
        if self.base != "nf4" or self.to == "nf4":
            lines.append(
                f"  logit drift vs adapter on the {self.base} base: "
                f"max {self.source_drift_max:.3g}, mean {self.source_drift_mean:.3g}"
            )
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _check_merge_args(base: str, to: str, max_shard_size: int | str) -> None:
    if base not in BASES:
        raise ConfigError(f"merge base {base!r}: must be one of {', '.join(BASES)}")
    if to not in TARGETS:
        raise ConfigError(f"merge target dtype {to!r}: must be one of {', '.join(TARGETS)}")
    parse_size(max_shard_size, "max shard size")


# Bytes per parameter of the merged output; nf4 also writes the fp32 merge beside it first.
_OUT_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "nf4": 4.5}


def _check_paths(
    model_spec: str | Path,
    adapter_dir: Path,
    out_dir: Path,
    base: str,
    to: str,
    max_shard_size: int | str,
    overwrite: bool,
) -> OutputPlan:
    """Arguments, adapter, model and output checks, before anything is loaded; the output's plan."""
    _check_merge_args(base, to, max_shard_size)
    method = check_adapter(adapter_dir)  # a missing or broken adapter fails before the model is loaded
    if not method.mergeable:
        raise ConfigError(
            f"{adapter_dir}: a {method.name} adapter cannot be merged into the base weights; use it as it is "
            "(qlorakit generate/eval/chat --adapter, or PEFT)"
        )
    source = resolve_model_path(model_spec)
    if base == "original" and source.is_dir() and is_quantized_folder(source):
        raise ConfigError(
            f"{source} is stored in 4 bits, so it has no original 16-bit weights to merge into; "
            "use --base nf4, or give the original (16-bit) model"
        )
    need = estimated_bytes(model_spec, _OUT_BYTES[to])
    return check_output(
        out_dir, command="merge", inputs=[model_spec, adapter_dir], overwrite=overwrite, need_bytes=need
    )


def _load_adapted(model_spec: str | Path, adapter_dir: Path, *, four_bit: bool, quant: QuantConfig):
    model, tokenizer = load_base(model_spec, four_bit=four_bit, quant=quant)
    load_adapter(model, adapter_dir)
    model.eval()
    return model, tokenizer


def _requantize(dense_dir: Path, out_dir: Path, tokenizer: Any, quant: QuantConfig) -> nn.Module:
    """Load the merged fp32 folder, quantize it to 4 bits in place and save it as a 4-bit folder."""
    from transformers import AutoModelForCausalLM

    compute_dtype = resolve_compute_dtype(quant.compute_dtype)
    merged = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    quantize_model(merged, quant.to_settings(compute_dtype))
    save_quantized(merged, tokenizer, out_dir)
    del merged
    gc.collect()
    return load_quantized(out_dir, compute_dtype)


def _adapter_4bit_logits(model_spec: str | Path, adapter_dir: Path, quant: QuantConfig, inputs: torch.Tensor):
    """Logits [B, T, V] of the adapter on the 4-bit base (what the adapter was trained with)."""
    model4, _ = _load_adapted(model_spec, adapter_dir, four_bit=True, quant=quant)
    logits = model_logits(model4, inputs)
    del model4
    gc.collect()
    return logits


def _merged_logits(
    to: str,
    dense_dir: Path,
    out_dir: Path,
    tokenizer: Any,
    quant: QuantConfig,
    inputs: torch.Tensor,
    notes: list[str],
) -> torch.Tensor:
    """Load what was written (re-quantizing it into `out_dir` for `to="nf4"`) and return its logits."""
    from transformers import AutoModelForCausalLM

    if to == "nf4":
        notes.append(
            "re-quantizing the merged weights to 4 bits changes the model: the adapter was trained "
            "against the original 4-bit weights, not these (see the drift numbers)"
        )
        warnings.warn(notes[-1], UserWarning, stacklevel=3)
        check = _requantize(dense_dir, out_dir, tokenizer, quant)
    else:
        check = AutoModelForCausalLM.from_pretrained(out_dir, dtype=parse_dtype(to))
    logits = model_logits(check.eval(), inputs)
    del check
    gc.collect()
    return logits


def merge_adapter(
    model_spec: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str = "nf4",
    to: str = "bf16",
    max_shard_size: int | str = "2GB",
    quant: QuantConfig | None = None,
    overwrite: bool = False,
) -> MergeReport:
    """Merge the adapter into `base` weights and write a plain HF folder (or a 4-bit one for `to="nf4"`).

    The output folder appears whole at the end or not at all, under the output rule of `qlorakit.core.outputs`.
    `quant` describes the 4-bit base the adapter was trained against (default: the `config.yaml` that
    training saved beside the adapter, else NF4, blocksize 64, double quantization).
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    plan = _check_paths(model_spec, adapter_dir, out_dir, base, to, max_shard_size, overwrite)
    quant = quant or adapter_quant_config(adapter_dir) or QuantConfig()
    model, tokenizer = _load_adapted(model_spec, adapter_dir, four_bit=base == "nf4", quant=quant)
    merged_layers = len(lora_layers(model))
    if merged_layers == 0:
        raise CheckpointError(f"{adapter_dir}: the adapter put no LoRA layer on the model; nothing to merge")
    inputs = sample_inputs(tokenizer, model.config.vocab_size)
    source_logits = model_logits(model, inputs)
    config, generation_config = model.config, model.generation_config
    dense_dtype = torch.float32 if to == "nf4" else parse_dtype(to)
    notes: list[str] = []
    with output_folder(plan) as tmp:
        dense_dir = tmp if to != "nf4" else make_temp_dir(out_dir.parent, f"{out_dir.name}.dense")
        try:
            meter = RssMeter()
            summary = write_hf_files(
                dense_dir,
                meter.wrap(dense_tensors(model)),
                config=config,
                tokenizer=tokenizer,
                dtype=dense_dtype,
                max_shard_size=max_shard_size,
                generation_config=generation_config,
            )
            del model  # the source model goes before anything else is loaded: one model in memory at a time
            gc.collect()
            adapter4_logits = source_logits
            if base != "nf4":
                adapter4_logits = _adapter_4bit_logits(model_spec, adapter_dir, quant, inputs)
            merged_logits = _merged_logits(to, dense_dir, tmp, tokenizer, quant, inputs, notes)
        finally:
            if dense_dir != tmp:
                shutil.rmtree(dense_dir, ignore_errors=True)
    drift = logit_drift(adapter4_logits, merged_logits)
    source_drift = logit_drift(source_logits, merged_logits)
    files = sorted(p.name for p in out_dir.iterdir() if p.suffix == ".safetensors")
    return MergeReport(
        out_dir, base, to, merged_layers, files, summary.total_size, summary.numel, summary.peak_buffer_bytes,
        meter.growth, *drift, *source_drift, notes,
    )  # fmt: skip
