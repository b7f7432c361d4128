"""Whole-model 4-bit quantization, and 4-bit folders compatible with transformers + bitsandbytes.

`quantize_model` swaps every `nn.Linear` (and GPT-2 style `Conv1D`) for a `Linear4bit`, one layer at a
time, dropping the original weight as soon as its layer is replaced, so peak memory stays near the model
plus one layer. `save_quantized` writes the folder transformers writes for a bitsandbytes 4-bit model
(same config entry, same tensor keys and bytes); `qlorakit.quant.loading` reads such folders, and
quantizes full-precision checkpoints while reading them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlorakit.core.atomic import atomic_write_text
from qlorakit.core.errors import FormatError, ModelError, QuantizationError
from qlorakit.core.outputs import OutputPlan, check_output, output_folder
from qlorakit.quant.blockwise import bits_per_parameter
from qlorakit.quant.linear import Linear4bit, default_compute_dtype
from qlorakit.quant.report import LayerReport, QuantizeReport, weight_error
from qlorakit.quant.select import as_linear, conv1d_class, is_quantizable, select_layers
from qlorakit.quant.settings import QuantSettings
from qlorakit.quant.state import state_to_tensors

STATE_KEY_MARK = ".weight.quant_state.bitsandbytes__"


def _tensor_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def quantize_layer(
    model: nn.Module, name: str, settings: QuantSettings, compute_dtype: torch.dtype
) -> LayerReport:
    """Replace the linear layer `name` of `model` by a Linear4bit (in place); returns its errors and sizes.

    `compute_dtype` is the resolved one (`settings.compute_dtype`, or the best for the layer's device).
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = as_linear(getattr(parent, child), conv1d_class())
    weight = linear.weight
    q = Linear4bit.from_linear(
        linear,
        blocksize=settings.blocksize,
        quant_type=settings.quant_type,
        double_quant=settings.double_quant,
        compute_dtype=compute_dtype,
    )
    q.train(parent.training)
    setattr(parent, child, q)  # the original module (and its weight) is released here
    del linear
    stats = weight_error(weight, q.dequantize(torch.float32))
    state = q.quant_state
    after = sum(t.numel() * t.element_size() for t in state_to_tensors("", q.packed, state).values())
    report = LayerReport(
        name=name,
        shape=tuple(state.shape),
        rmse=stats.rmse,
        max_abs_err=stats.max_abs,
        bytes_before=weight.numel() * weight.element_size(),
        bytes_after=after,
        bits_per_parameter=bits_per_parameter(state),
    )
    del weight
    return report


def quantize_model(model: nn.Module, settings: QuantSettings | None = None) -> QuantizeReport:
    """Replace, in place and one at a time, each nn.Linear / Conv1D of `model` by a Linear4bit.

    `settings.skip` names the layers kept in full precision; weights tied to an embedding are never
    quantized. `settings.compute_dtype` None picks the best dtype for the device of each layer. Returns
    per-layer errors and sizes. None: the defaults of `QuantSettings` (NF4, blocksize 64, double quant).
    """
    settings = settings if settings is not None else QuantSettings()
    started = time.perf_counter()
    bytes_before = _tensor_bytes(model)
    names, skipped = select_layers(model, settings.skip)
    if not names:
        raise QuantizationError(
            f"no linear layer left to quantize in {type(model).__name__} (skip={list(settings.skip)})"
        )
    layers = []
    chosen = settings.compute_dtype
    for name in names:
        device = model.get_submodule(name).weight.device
        chosen = (
            settings.compute_dtype if settings.compute_dtype is not None else default_compute_dtype(device)
        )
        layers.append(quantize_layer(model, name, settings, chosen))
    return QuantizeReport(
        layers=tuple(layers),
        skipped=tuple(skipped),
        quant_type=settings.quant_type,
        blocksize=settings.blocksize,
        double_quant=settings.double_quant,
        compute_dtype=chosen,
        model_bytes_before=bytes_before,
        model_bytes_after=_tensor_bytes(model),
        seconds=time.perf_counter() - started,
    )


def quantized_layers(model: nn.Module) -> list[tuple[str, Linear4bit]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]


def bnb_quantization_config(
    *, quant_type: str, double_quant: bool, compute_dtype: torch.dtype, skip_modules: list[str] | None
) -> dict[str, Any]:
    """The `quantization_config` entry transformers writes for a bitsandbytes 4-bit model
    (`BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()`)."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }


def _skip_modules_entry(model: nn.Module) -> list[str] | None:
    """None when transformers' own default skips are exactly the layers left in full precision
    (what it writes itself), else the explicit list (which replaces its defaults on load)."""
    conv1d = conv1d_class()
    kept = sorted(n for n, m in model.named_modules() if is_quantizable(m, conv1d))
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        return kept
    candidates = [
        n for n, m in model.named_modules() if is_quantizable(m, conv1d) or isinstance(m, Linear4bit)
    ]
    defaults = get_keys_to_not_convert(model)
    default_kept = sorted(n for n in candidates if not should_convert_module(n, defaults))
    return None if default_kept == kept else kept


def _checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with each Linear4bit's buffers replaced by the bitsandbytes checkpoint keys."""
    state = model.state_dict()
    for name, layer in quantized_layers(model):
        prefix = f"{name}."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        tensors = state_to_tensors(prefix, layer.packed, layer.quant_state)
        state.update({k: v.detach().cpu() for k, v in tensors.items()})
        if layer.bias is not None:
            state[f"{prefix}bias"] = layer.bias.detach()
    return state


def _single(values: set[Any], what: str) -> Any:
    if len(values) != 1:
        raise FormatError(
            f"a 4-bit folder has one {what} for the whole model, but the layers use {sorted(map(str, values))}"
        )
    return values.pop()


def save_quantized(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    plan: OutputPlan | None = None,
) -> Path:
    """Write `model` (after quantize_model) and `tokenizer` (or None) as a bitsandbytes 4-bit HF folder.

    The folder (config.json with quantization_config, model.safetensors or shards + index,
    generation_config.json, tokenizer files) appears atomically. Returns its path. `out_dir` follows the
    output rule of `qlorakit.core.outputs`; a command that checked it before its work passes that `plan`.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ModelError(f"save_quantized needs a transformers PreTrainedModel, got {type(model).__name__}")
    layers = quantized_layers(model)
    if not layers:
        raise QuantizationError(
            "the model has no 4-bit layers: run quantize_model(model) before save_quantized"
        )
    states = [layer.quant_state for _, layer in layers]
    qconfig = bnb_quantization_config(
        quant_type=_single({s.quant_type for s in states}, "quant type"),
        double_quant=_single({s.nested is not None for s in states}, "double-quantization setting"),
        compute_dtype=_single({layer.compute_dtype for _, layer in layers}, "compute dtype"),
        skip_modules=_skip_modules_entry(model),
    )
    out = Path(out_dir)
    plan = plan or check_output(out, command="quantize", overwrite=overwrite)
    with output_folder(plan) as tmp:
        model.save_pretrained(tmp, state_dict=_checkpoint_state_dict(model), max_shard_size=max_shard_size)
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        config["quantization_config"] = qconfig
        # the exact serialization transformers uses for config.json
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


__all__ = [
    "bnb_quantization_config",
    "quantize_layer",
    "quantize_model",
    "quantized_layers",
    "save_quantized",
]
