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
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlorakit.config import QuantConfig
from qlorakit.errors import CheckpointError, ConfigError, ModelError

BASES = ("nf4", "original")
TARGETS = ("bf16", "fp16", "fp32", "nf4")

# ---------------------------------------------------------------------------------------------------------
# Pure maths


def merge_lora_weight(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merged weight [out, in] in fp32.

    weight [out, in], lora_A [r, in], lora_B [out, r], magnitude [out] (DoRA) or None (LoRA).
    LoRA: `W + s * B @ A`. DoRA: `(m / n)[:, None] * (W + s * B @ A)` with n the row L2 norm of
    `W + s * B @ A` (PEFT's `get_weight_norm` along dim 1).
    """
    from qlorakit.lora.dora import dora_merged_weight, dora_weight_norm
    from qlorakit.lora.layer import delta_weight

    w = weight.float()
    delta = delta_weight(lora_A, lora_B, scaling).to(w.device)
    if magnitude is None:
        return w + delta
    norm = dora_weight_norm(w, lora_A, lora_B, scaling)
    return dora_merged_weight(w, delta, magnitude.float().to(w.device), norm)


def logit_drift(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(max, mean) absolute difference of two logit tensors [B, T, V], computed in fp32."""
    diff = (reference.float() - other.float()).abs()
    return float(diff.max()), float(diff.mean())


# ---------------------------------------------------------------------------------------------------------
# Dense tensors of a (4-bit, LoRA-wrapped) model, in the original architecture's key layout


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense fp32 weight [out, in] and bias of a linear-like layer, with the active adapter merged.

    Explicit dispatch: LoRALinear (merge its active adapter unless disabled or already merged in place),
    Linear4bit (dequantize), nn.Linear (as is).
    """
    from qlorakit.lora.layer import LoRALinear, base_weight
    from qlorakit.quant.linear import Linear4bit

    if isinstance(module, LoRALinear):
        weight = base_weight(module.base_layer, torch.float32)
        bias = module.base_layer.bias
        if module.disable_adapters or module.merged_adapters:
            return weight, bias
        name = module.active_adapter
        magnitude = module.lora_magnitude_vector[name].weight if module.use_dora[name] else None
        merged = merge_lora_weight(
            weight, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name], magnitude
        )
        return merged, bias
    if isinstance(module, Linear4bit):
        return module.dequantize(torch.float32), module.bias
    if isinstance(module, nn.Linear):
        return module.weight.detach().float(), module.bias
    raise ModelError(f"{type(module).__name__} is not a linear layer qlorakit can export")


def _skeleton(config: Any) -> nn.Module:
    """The original architecture with meta tensors: its keys, shapes, layer types and tied weights."""
    from transformers import AutoModelForCausalLM

    from qlorakit.export.hf import export_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(export_config(config, torch.float32))


def _resolve(model: nn.Module, path: str) -> nn.Module:
    """`model.get_submodule(path)`, seeing through `ModulesToSaveWrapper` (its active copy)."""
    from qlorakit.lora.modules_to_save import ModulesToSaveWrapper

    module = model
    for part in path.split(".") if path else []:
        if isinstance(module, ModulesToSaveWrapper):
            module = module.active_module()
        try:
            module = module.get_submodule(part)
        except AttributeError as exc:
            raise ModelError(f"model has no module {path!r} that its config's architecture expects") from exc
    if isinstance(module, ModulesToSaveWrapper):
        module = module.active_module()
    return module


def _linear_types() -> tuple[type, ...]:
    from qlorakit.lora.layer import LoRALinear
    from qlorakit.quant.linear import Linear4bit

    return (LoRALinear, Linear4bit)


def dense_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(key, tensor)` for a plain checkpoint of `model`'s architecture, one tensor at a time.

    Keys, shapes and layer types come from a meta-device copy of the original architecture, so LoRA
    wrappers (`base_layer`, `lora_A`) and 4-bit buffers disappear, GPT-2 style `Conv1D` weights are
    transposed back to [in, out], and tied weights (lm_head = embeddings) are written once.
    Each merged/dequantized layer exists only until the consumer has taken it.
    """
    from transformers.pytorch_utils import Conv1D

    skeleton = _skeleton(model.config)
    keys = set(skeleton.state_dict().keys())
    seen: set[int] = set()
    special = _linear_types()
    for path, skel in skeleton.named_modules():
        own = [
            (name, ref)
            for name, ref in [*skel.named_parameters(recurse=False), *skel.named_buffers(recurse=False)]
            if (f"{path}.{name}" if path else name) in keys
        ]
        if not own:
            continue
        live = _resolve(model, path)
        values: dict[str, torch.Tensor | None]
        if isinstance(live, special):
            weight, bias = linear_weight(live)
            values = {"weight": weight.T if isinstance(skel, Conv1D) else weight, "bias": bias}
        else:
            values = {name: getattr(live, name) for name, _ in own}
        for name, ref in own:
            key = f"{path}.{name}" if path else name
            if id(ref) in seen:
                if isinstance(live, special) and live is not _resolve(model, _tied_source(skeleton, ref)):
                    raise ModelError(
                        f"{key} is tied to the input embeddings but carries its own adapter/4-bit weights; "
                        "set tie_word_embeddings=false in the config or leave it out of the LoRA targets"
                    )
                continue
            seen.add(id(ref))
            tensor = values.get(name)
            if tensor is None or tuple(tensor.shape) != tuple(ref.shape):
                got = None if tensor is None else tuple(tensor.shape)
                raise ModelError(f"{key}: expected shape {tuple(ref.shape)} from the model config, got {got}")
            yield key, tensor.detach()


def _tied_source(skeleton: nn.Module, ref: torch.Tensor) -> str:
    """Module path of the first module that owns the (tied) tensor `ref`."""
    for path, module in skeleton.named_modules():
        for _, tensor in module.named_parameters(recurse=False):
            if tensor is ref:
                return path
    return ""


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_for_export(
    spec: str | Path, *, four_bit: bool = False, quant: QuantConfig | None = None
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) in eval mode: quantized to 4 bits (`four_bit`), else as stored."""
    from qlorakit.eval.generation import load_base

    return load_base(spec, four_bit=four_bit, quant=quant)


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
    from qlorakit.export.hf import parse_size

    if base not in BASES:
        raise ConfigError(f"merge base {base!r}: must be one of {', '.join(BASES)}")
    if to not in TARGETS:
        raise ConfigError(f"merge target dtype {to!r}: must be one of {', '.join(TARGETS)}")
    parse_size(max_shard_size)


def _check_paths(model_spec: str | Path, adapter_dir: Path, out_dir: Path, base: str) -> None:
    from qlorakit.lora.peft_format import read_adapter_config
    from qlorakit.models import is_quantized_folder, resolve_model_path

    read_adapter_config(adapter_dir)  # a missing or broken adapter fails before the model is loaded
    source = resolve_model_path(model_spec)
    if base == "original" and source.is_dir() and is_quantized_folder(source):
        raise ConfigError(
            f"{source} is stored in 4 bits, so it has no original 16-bit weights to merge into; "
            "use --base nf4, or give the original (16-bit) model"
        )
    out = out_dir.resolve()
    for name, path in (("model", Path(model_spec)), ("adapter", adapter_dir)):
        if path.exists() and path.resolve() in (out, *out.parents):
            raise ConfigError(
                f"--out {out_dir} would overwrite the {name} folder {path}; choose another folder"
            )


def _load_adapted(model_spec: str | Path, adapter_dir: Path, *, four_bit: bool, quant: QuantConfig):
    from qlorakit.lora.peft_format import load_adapter

    model, tokenizer = load_for_export(model_spec, four_bit=four_bit, quant=quant)
    load_adapter(model, adapter_dir)
    model.eval()
    return model, tokenizer


def _requantize(dense_dir: Path, out_dir: Path, tokenizer: Any, quant: QuantConfig) -> nn.Module:
    """Load the merged fp32 folder, quantize it to 4 bits in place and save it as a 4-bit folder."""
    from transformers import AutoModelForCausalLM

    from qlorakit.eval.generation import resolve_compute_dtype
    from qlorakit.quant.convert import load_quantized, quantize_model, save_quantized

    compute_dtype = resolve_compute_dtype(quant.compute_dtype)
    merged = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    quantize_model(
        merged,
        skip=tuple(quant.skip),
        blocksize=quant.blocksize,
        quant_type=quant.quant_type,
        double_quant=quant.double_quant,
        compute_dtype=compute_dtype,
    )
    save_quantized(merged, tokenizer, out_dir)
    del merged
    gc.collect()
    return load_quantized(out_dir, compute_dtype)


def merge_adapter(
    model_spec: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str = "nf4",
    to: str = "bf16",
    max_shard_size: int | str = "2GB",
    quant: QuantConfig | None = None,
) -> MergeReport:
    """Merge the adapter into `base` weights and write a plain HF folder (or a 4-bit one for `to="nf4"`).

    The output folder appears whole at the end or not at all. `quant` describes the 4-bit base the
    adapter was trained against (default: the `config.yaml` that training saved beside the adapter,
    else NF4, blocksize 64, double quantization).
    """
    from transformers import AutoModelForCausalLM

    from qlorakit.atomic import atomic_directory
    from qlorakit.eval.generation import adapter_quant_config
    from qlorakit.export.hf import parse_dtype, write_hf_files
    from qlorakit.lora.inject import lora_layers

    _check_merge_args(base, to, max_shard_size)
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    _check_paths(model_spec, adapter_dir, out_dir, base)
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
    with atomic_directory(out_dir) as tmp:
        dense_dir = tmp if to != "nf4" else Path(tempfile.mkdtemp(prefix=".merge-dense.", dir=out_dir.parent))
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
            del model
            gc.collect()
            adapter4_logits = source_logits
            if base != "nf4":
                model4, _ = _load_adapted(model_spec, adapter_dir, four_bit=True, quant=quant)
                adapter4_logits = model_logits(model4, inputs)
                del model4
                gc.collect()
            if to == "nf4":
                notes.append(
                    "re-quantizing the merged weights to 4 bits changes the model: the adapter was trained "
                    "against the original 4-bit weights, not these (see the drift numbers)"
                )
                warnings.warn(notes[-1], stacklevel=2)
                check = _requantize(dense_dir, tmp, tokenizer, quant)
            else:
                check = AutoModelForCausalLM.from_pretrained(tmp, dtype=dense_dtype)
            merged_logits = model_logits(check.eval(), inputs)
            del check
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
