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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qlorakit.core.atomic import atomic_write_text
from qlorakit.core.errors import FormatError, ModelError, QuantizationError
from qlorakit.core.outputs import OutputPlan, check_output, output_folder
from qlorakit.quant.blockwise import bits_per_parameter
from qlorakit.quant.linear import Linear4bit, default_compute_dtype
from qlorakit.quant.report import LayerReport, QuantizeReport, weight_error
from qlorakit.quant.state import state_to_tensors

if TYPE_CHECKING:
    from qlorakit.config import QuantConfig

STATE_KEY_MARK = ".weight.quant_state.bitsandbytes__"


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _is_quantizable(module: nn.Module, conv1d: type | None) -> bool:
    # Exact type, as transformers does: subclasses of nn.Linear (adapters, other 4-bit layers) are left alone.
    return type(module) is nn.Linear or (conv1d is not None and isinstance(module, conv1d))


def matches_skip(name: str, patterns: Sequence[str]) -> bool:
    """True when `name` equals a pattern or ends with "." + pattern (a module-name suffix)."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _as_linear(module: nn.Module, conv1d: type | None) -> nn.Linear:
    """`module` itself, or for a Conv1D (weight [in, out]) a Linear view with weight [out, in]."""
    if type(module) is nn.Linear:
        return module
    assert conv1d is not None and isinstance(module, conv1d)
    in_features, out_features = module.weight.shape
    shim = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
    shim.weight = nn.Parameter(module.weight.detach().t(), requires_grad=False)
    if module.bias is not None:
        shim.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return shim


def _tensor_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _shared_weight_ids(model: nn.Module) -> set[int]:
    """ids of weights tied to an embedding or owned by more than one module: never quantized."""
    owners: dict[int, int] = {}
    embeddings: set[int] = set()
    for module in model.modules():
        for _, p in module.named_parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
        if isinstance(module, nn.Embedding):
            embeddings.add(id(module.weight))
    return embeddings | {pid for pid, n in owners.items() if n > 1}


def select_layers(model: nn.Module, skip: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(names of the layers `quantize_model` replaces, [(name, why kept)]): exact nn.Linear / Conv1D, not
    matching `skip`, weight not shared with an embedding or another module.

    Names only: holding module objects would keep every original weight alive until the end.
    """
    conv1d = _conv1d_class()
    shared = _shared_weight_ids(model)
    names, skipped = [], []
    for name, module in model.named_modules():
        if not _is_quantizable(module, conv1d):
            continue
        if id(module.weight) in shared:
            skipped.append((name, "tied to an embedding"))
        elif matches_skip(name, skip):
            skipped.append((name, "skipped"))
        else:
            names.append(name)
    return names, skipped


def _quantize_one(model: nn.Module, name: str, conv1d: type | None, settings: dict[str, Any]) -> LayerReport:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = _as_linear(getattr(parent, child), conv1d)
    weight = linear.weight
    q = Linear4bit.from_linear(linear, **settings)
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


def quantize_model_as(
    model: nn.Module, quant: QuantConfig, compute_dtype: torch.dtype | None
) -> QuantizeReport:
    """`quantize_model` with the settings of a `quant` config section."""
    return quantize_model(
        model,
        skip=tuple(quant.skip),
        blocksize=quant.blocksize,
        quant_type=quant.quant_type,
        double_quant=quant.double_quant,
        compute_dtype=compute_dtype,
    )


def quantize_model(
    model: nn.Module,
    *,
    skip: Sequence[str] = ("lm_head",),
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> QuantizeReport:
    """Replace, in place and one at a time, each nn.Linear / Conv1D of `model` by a Linear4bit.

    skip: module names (exact path or name suffix such as "lm_head" or "mlp.down_proj") to keep in full
    precision; weights tied to an embedding are never quantized. compute_dtype None picks the best
    dtype for the device of each layer. Returns per-layer errors and sizes.
    """
    if isinstance(skip, str):
        raise QuantizationError(f"skip must be a sequence of module names, got the string {skip!r}")
    started = time.perf_counter()
    conv1d = _conv1d_class()
    bytes_before = _tensor_bytes(model)
    names, skipped = select_layers(model, skip)
    if not names:
        raise QuantizationError(
            f"no linear layer left to quantize in {type(model).__name__} (skip={list(skip)})"
        )
    layers = []
    chosen = compute_dtype
    for name in names:
        device = model.get_submodule(name).weight.device
        chosen = compute_dtype if compute_dtype is not None else default_compute_dtype(device)
        settings = {
            "blocksize": blocksize,
            "quant_type": quant_type,
            "double_quant": double_quant,
            "compute_dtype": chosen,
        }
        layers.append(_quantize_one(model, name, conv1d, settings))
    return QuantizeReport(
        layers=tuple(layers),
        skipped=tuple(skipped),
        quant_type=quant_type,
        blocksize=blocksize,
        double_quant=double_quant,
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
    conv1d = _conv1d_class()
    kept = sorted(n for n, m in model.named_modules() if _is_quantizable(m, conv1d))
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        return kept
    candidates = [
        n for n, m in model.named_modules() if _is_quantizable(m, conv1d) or isinstance(m, Linear4bit)
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
    "matches_skip",
    "quantize_model",
    "quantized_layers",
    "save_quantized",
]
