"""Loading a base model as training builds it (4-bit or 16-bit), and what an adapter folder says about it.

Used by train, eval and export alike: the compute dtype `auto` resolves here the same way for all of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qlorakit.config import QuantConfig, load_config
from qlorakit.core.dtypes import parse_dtype
from qlorakit.core.errors import ConfigError
from qlorakit.models.resolve import load_model
from qlorakit.quant.linear import Linear4bit, cpu_has_native_bf16, default_compute_dtype


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, Path]:
    """`["NAME=DIR", "DIR"]` -> {name: folder}; a bare folder is named after itself."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        name = name.strip()
        if not name or "." in name:
            raise ConfigError(
                f"adapter {spec!r}: its name {name!r} must be non-empty without '.'; use NAME=DIR to name it"
            )
        if name in adapters:
            raise ConfigError(f"adapter name {name!r} is given twice; use NAME=DIR to tell them apart")
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(
                f"adapter {spec!r}: {folder / 'adapter_config.json'} not found (not an adapter folder)"
            )
        adapters[name] = folder
    return adapters


def is_four_bit(model: nn.Module) -> bool:
    """True when any layer of `model` holds 4-bit weights."""
    return any(isinstance(m, Linear4bit) for m in model.modules())


def resolve_compute_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """`quant.compute_dtype` as a torch dtype; `auto` is what `device` computes natively (as in training).

    Pinning bfloat16 on a CPU that only emulates it warns: there a bf16 matmul is ~4x slower than fp32, and
    a training step of the default model took ~20x longer (60 s vs 3 s on an AVX2-only EPYC)."""
    if name == "auto":
        return default_compute_dtype(device)
    dtype = parse_dtype(name)
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "compute_dtype bfloat16: this CPU has no native bf16 (no AVX512-BF16 or AMX), so every bf16 "
            "matmul is emulated and runs several times slower than float32; use compute_dtype: auto "
            "(float32 here) unless you need bf16 numerics",
            RuntimeWarning,
            stacklevel=2,
        )
    return dtype


def adapter_quant_config(adapter_dir: str | Path) -> QuantConfig | None:
    """The `quant` section of the `config.yaml` that `qlorakit train` saves beside an adapter, if any.

    It says exactly how the 4-bit base the adapter was trained against was built (quant type, block
    size, double quantization, compute dtype, skipped layers).
    """
    path = Path(adapter_dir) / "config.yaml"
    return load_config(path).quant if path.is_file() else None


def load_base(
    spec: str | Path, *, four_bit: bool = True, quant: QuantConfig | None = None
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) in eval mode, built as training builds it.

    The weights load in the compute dtype (`quant.compute_dtype`; fp32 on CPUs without native bf16) and,
    with `four_bit`, are quantized layer by layer as they are read. A folder already stored in 4 bits is
    used as it is.
    """
    quant = quant or QuantConfig()
    compute_dtype = resolve_compute_dtype(quant.compute_dtype)
    # With four_bit, each layer is quantized as it is read (a folder already in 4 bits is used as stored).
    model, tokenizer = load_model(spec, dtype=compute_dtype, quantize=quant if four_bit else None)
    model.eval()
    return model, tokenizer


def shared_quant_config(adapters: Mapping[str, str | Path]) -> QuantConfig | None:
    """The first adapter's saved quant settings; a warning when the adapters were trained on different bases."""
    configs = {name: adapter_quant_config(path) for name, path in adapters.items()}
    first = next(iter(configs.values()))
    differing = [name for name, cfg in configs.items() if cfg is not None and cfg != first]
    if differing:
        warnings.warn(
            f"adapters {differing} were trained against a 4-bit base built with other settings than "
            f"{next(iter(configs))!r}; they share one base here, so their outputs can differ from training",
            UserWarning,
            stacklevel=3,
        )
    return first


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model a data-parallel wrapper (DDP) holds, else `model` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model
