"""The PEFT LoRA adapter folder: `adapter_config.json` + `adapter_model.safetensors`, read and written.

Keys are `base_model.model.<module path>.lora_A.weight` [r, in], `...lora_B.weight` [out, r], DoRA's
`...lora_magnitude_vector` [out], modules_to_save under `base_model.model.<path>.<param>` and trainable
biases under their model paths. The config carries every field PEFT 0.21 writes, sorted, as PEFT does.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlorakit.config import LoRAConfig, config_from_dict
from qlorakit.core.atomic import atomic_directory, atomic_save_safetensors, atomic_write_text
from qlorakit.core.errors import CheckpointError, ConfigError, FormatError, ModelError
from qlorakit.lora.inject import (
    ALL_LINEAR,
    inject_lora,
    lora_layers,
    modules_to_save_paths,
    pattern_value,
    select_targets,
    set_trainable,
    trainable_bias_params,
)
from qlorakit.lora.layer import LoRALinear, lora_scaling
from qlorakit.lora.modules_to_save import ModulesToSaveWrapper

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_FORMAT_VERSION = "0.21.2"

# `LoraConfig().to_dict()` of PEFT 0.21.2 with its defaults: every field PEFT writes, so PEFT reads our
# files without warnings and a diff against a PEFT-written config shows only real differences.
_PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16,
    "r": 8, "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}  # fmt: skip

# Fields that change what the adapter computes in ways qlorakit does not implement: a non-default value
# makes loading fail instead of silently computing something else.
_UNSUPPORTED = (
    "alora_invocation_tokens", "arrow_config", "fan_in_fan_out", "kasa_config", "layer_replication",
    "layers_pattern", "lora_bias", "megatron_config", "monteclora_config", "target_parameters",
    "trainable_token_indices", "use_bdlora", "use_qalora", "velora_config",
)  # fmt: skip
# Initialisations that only shape the starting A/B (the saved weights say everything); PiSSA, OLoRA,
# CorDA, LoftQ, LoRA-GA and MiCA also rewrite the base weights, which an adapter file alone cannot restore.
_LOADABLE_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def adapter_config_dict(
    cfg: LoRAConfig, *, base_model_name_or_path: str, targets: list[str]
) -> dict[str, Any]:
    """The adapter_config.json content for `cfg` (`targets`: the wrapped paths, written for `all-linear`
    as PEFT writes it: the expanded module list)."""
    out = dict(_PEFT_DEFAULTS)
    target_modules = sorted(targets) if cfg.target_modules == ALL_LINEAR else cfg.target_modules
    out.update(
        alpha_pattern={k: _number(v) for k, v in cfg.alpha_pattern.items()},
        base_model_name_or_path=base_model_name_or_path,
        bias=cfg.bias,
        exclude_modules=cfg.exclude_modules or None,
        init_lora_weights=True if cfg.init == "default" else cfg.init,
        layers_to_transform=list(cfg.layers_to_transform) if cfg.layers_to_transform is not None else None,
        lora_alpha=_number(cfg.alpha),
        lora_dropout=cfg.dropout,
        modules_to_save=list(cfg.modules_to_save) or None,
        r=cfg.r,
        rank_pattern=dict(cfg.rank_pattern),
        target_modules=list(target_modules) if isinstance(target_modules, list) else target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
    )
    return out


def adapter_state_dict(model: nn.Module, adapter_name: str, bias: str) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for `adapter_name`, under PEFT's keys (detached CPU copies)."""
    live = _live_tensors(model, adapter_name, bias)
    if not any(key.endswith(".lora_A.weight") for key in live):
        raise ModelError(
            f"the model has no LoRA layers with adapter {adapter_name!r}; call inject_lora first"
        )
    return {k: v.detach().to("cpu").contiguous() for k, v in live.items()}


def _check_cfg_describes_model(
    model: nn.Module, cfg: LoRAConfig, adapter_name: str, targets: list[str]
) -> None:
    """The config written must reproduce the adapter: same ranks, scalings and DoRA use on every layer."""
    for path in targets:
        layer = model.get_submodule(path)
        r = int(pattern_value(cfg.rank_pattern, path, cfg.r))
        alpha = float(pattern_value(cfg.alpha_pattern, path, cfg.alpha))
        want = (r, lora_scaling(r, alpha, cfg.use_rslora), cfg.use_dora)
        have = (layer.r[adapter_name], layer.scaling[adapter_name], layer.use_dora[adapter_name])
        if want != have:
            raise ConfigError(
                f"the LoRA config does not describe adapter {adapter_name!r} at {path!r}: the layer has "
                f"r={have[0]}, scaling={have[1]:g}, dora={have[2]} but the config gives r={want[0]}, "
                f"scaling={want[1]:g}, dora={want[2]}; pass the config the adapter was injected with"
            )


def save_adapter(
    model: nn.Module,
    out_dir: Path,
    cfg: LoRAConfig,
    *,
    base_model_name_or_path: str,
    adapter_name: str = "default",
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT's format) into `out_dir`; returns it.

    A new folder appears whole (built beside it, then renamed); in an existing folder each file is
    replaced atomically, weights first, so the config never describes weights that are not there.
    """
    out_dir = Path(out_dir)
    tensors = adapter_state_dict(model, adapter_name, cfg.bias)
    targets = [p for p, layer in lora_layers(model).items() if adapter_name in layer.lora_A]
    _check_cfg_describes_model(model, cfg, adapter_name, targets)
    config = adapter_config_dict(cfg, base_model_name_or_path=base_model_name_or_path, targets=targets)
    text = json.dumps(config, indent=2, sort_keys=True)  # byte-for-byte what PEFT writes (no final newline)
    metadata = {"format": "pt"}
    if out_dir.is_dir():
        atomic_save_safetensors(tensors, out_dir / WEIGHTS_NAME, metadata=metadata)
        atomic_write_text(out_dir / CONFIG_NAME, text)
    else:
        with atomic_directory(out_dir) as tmp:
            atomic_save_safetensors(tensors, tmp / WEIGHTS_NAME, metadata=metadata)
            atomic_write_text(tmp / CONFIG_NAME, text)
    return out_dir


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_config_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"{path}: adapter config not found (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc}); re-save the adapter") from exc
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object of adapter settings, got {type(data).__name__}")
    return data


def _lora_section(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Map PEFT's field names onto `LoRAConfig`'s, rejecting what qlorakit cannot compute faithfully."""
    if data.get("peft_type") != "LORA":
        raise FormatError(
            f"{path}: peft_type {data.get('peft_type')!r} is not supported; qlorakit loads LoRA adapters "
            '(peft_type "LORA") only'
        )
    bad = [k for k in _UNSUPPORTED if data.get(k) not in (None, _PEFT_DEFAULTS[k])]
    if bad:
        raise FormatError(
            f"{path}: uses PEFT features qlorakit does not implement: {', '.join(f'{k}={data[k]!r}' for k in bad)}"
        )
    init = data.get("init_lora_weights", True)
    if init not in _LOADABLE_INITS:
        raise FormatError(
            f"{path}: init_lora_weights={init!r} changes the base weights, which the adapter file alone cannot "
            "restore; convert it to a plain LoRA adapter with PEFT (save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in data:
            raise FormatError(f"{path}: missing required field {key!r}")
    layers = data.get("layers_to_transform")
    return {
        "r": data["r"],
        "alpha": data["lora_alpha"],
        "dropout": data.get("lora_dropout", 0.0),
        "target_modules": data["target_modules"],
        "exclude_modules": data.get("exclude_modules") or [],
        "layers_to_transform": [layers] if isinstance(layers, int) else layers,
        "rank_pattern": data.get("rank_pattern") or {},
        "alpha_pattern": data.get("alpha_pattern") or {},
        "modules_to_save": data.get("modules_to_save") or [],
        "bias": data.get("bias", "none"),
        "use_rslora": bool(data.get("use_rslora", False)),
        "use_dora": bool(data.get("use_dora", False)),
        "init": "gaussian" if init == "gaussian" else "default",
    }


def read_adapter_config(adapter_dir: Path) -> LoRAConfig:
    """The `LoRAConfig` of a PEFT/qlorakit adapter folder (FormatError/CheckpointError naming the file)."""
    path = Path(adapter_dir) / CONFIG_NAME
    section = _lora_section(read_config_json(path), path)
    exclude = section["exclude_modules"]
    if isinstance(exclude, str):  # PEFT allows a regex here; validated as a list, then put back
        section["exclude_modules"] = []
    try:
        lora = config_from_dict({"lora": section}, source=str(path)).lora
    except ConfigError as exc:
        raise FormatError(str(exc)) from exc
    if isinstance(exclude, str):
        lora = dataclasses.replace(lora, exclude_modules=exclude)
    return lora


def _read_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        pickled = Path(adapter_dir) / "adapter_model.bin"
        hint = (
            f"; {pickled.name} is a pickle and is not loaded (re-save with safe_serialization=True)"
            if pickled.is_file()
            else ""
        )
        raise CheckpointError(f"{path}: adapter weights not found{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); the file is corrupt or truncated"
        ) from exc


# ---------------------------------------------------------------------------------------------------------
# Loading


def _expected_shapes(model: nn.Module, cfg: LoRAConfig, adapter_name: str) -> dict[str, tuple[int, ...]]:
    """Every key (and its shape) an adapter made with `cfg` for this model holds, before anything is injected."""
    targets = select_targets(model, cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in targets:
        module = model.get_submodule(path)
        r = int(pattern_value(cfg.rank_pattern, path, cfg.r))
        shapes[f"{PREFIX}{path}.lora_A.weight"] = (r, module.in_features)
        shapes[f"{PREFIX}{path}.lora_B.weight"] = (module.out_features, r)
        if cfg.use_dora:
            shapes[f"{PREFIX}{path}.lora_magnitude_vector"] = (module.out_features,)
        base = module.base_layer if isinstance(module, LoRALinear) else module
        if cfg.bias == "lora_only" and base.bias is not None:
            shapes[f"{PREFIX}{path}.base_layer.bias"] = tuple(base.bias.shape)
    for path in modules_to_save_paths(model, list(cfg.modules_to_save)):
        module = model.get_submodule(path)
        inner = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        shapes.update({f"{PREFIX}{path}.{k}": tuple(v.shape) for k, v in inner.state_dict().items()})
    if cfg.bias == "all":
        for name, param in trainable_bias_params(model):
            owner = name[: -len(".bias")]
            wrapped = owner in targets and not isinstance(model.get_submodule(owner), LoRALinear)
            shapes[f"{PREFIX}{owner}.base_layer.bias" if wrapped else f"{PREFIX}{name}"] = tuple(param.shape)
    return shapes


def _check_keys(found: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: Path) -> None:
    for key, shape in expected.items():
        if key in found and tuple(found[key].shape) != shape:
            raise FormatError(
                f"{source}: tensor {key!r} has shape {list(found[key].shape)} but this model needs {list(shape)}; "
                "the adapter was made for a different base model (or different rank settings)"
            )
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) this model has no place for, e.g. {unexpected[:3]}")
        raise FormatError(
            f"{source}: {'; '.join(parts)}; the adapter does not fit this model (a different base model or config)"
        )


def _live_tensors(model: nn.Module, adapter_name: str, bias: str) -> dict[str, torch.Tensor]:
    """The model's own adapter parameters under the on-disk keys (so loading is a copy into each)."""
    live: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model).items():
        if adapter_name not in layer.lora_A:
            continue
        live[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        live[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        if adapter_name in layer.lora_magnitude_vector:
            live[f"{PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
        if bias == "lora_only" and layer.base_layer.bias is not None:
            live[f"{PREFIX}{path}.base_layer.bias"] = layer.base_layer.bias
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, value in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                live[f"{PREFIX}{path}.{key}"] = value
    if bias == "all":
        live.update({f"{PREFIX}{name}": p for name, p in trainable_bias_params(model)})
    return live


def _warn_if_other_base(model: nn.Module, saved_base: object, source: Path) -> None:
    config = getattr(model, "config", None)
    current = getattr(config, "_name_or_path", "") if config is not None else ""
    if saved_base and current and str(saved_base) != str(current):
        warnings.warn(
            f"{source}: the adapter was trained on {saved_base!r} but is being loaded onto {current!r}; "
            "the shapes match, so it loads, but outputs are only meaningful on the same base weights",
            stacklevel=3,
        )


def load_adapter(
    model: nn.Module, adapter_dir: Path, *, adapter_name: str = "default", is_trainable: bool = False
) -> LoRAConfig:
    """Load a PEFT/qlorakit LoRA adapter folder into `model` (plain or 4-bit base) as `adapter_name`.

    Injects the LoRA layers the config describes, checks every tensor name and shape against the model
    before touching it, copies the weights in and makes the adapter active. With `is_trainable=False`
    the adapter is frozen (inference); otherwise it trains like a freshly injected one.
    """
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    config_data = read_config_json(adapter_dir / CONFIG_NAME)
    tensors = _read_weights(adapter_dir)
    source = adapter_dir / WEIGHTS_NAME
    if adapter_name in {n for layer in lora_layers(model).values() for n in layer.lora_A}:
        raise ConfigError(
            f"adapter {adapter_name!r} is already in the model; load under another adapter_name"
        )
    try:
        expected = _expected_shapes(model, cfg, adapter_name)
    except ModelError as exc:
        raise FormatError(f"{adapter_dir / CONFIG_NAME}: does not fit this model: {exc}") from exc
    _check_keys(tensors, expected, source)
    _warn_if_other_base(model, config_data.get("base_model_name_or_path"), adapter_dir / CONFIG_NAME)
    inject_lora(model, cfg, adapter_name=adapter_name)
    live = _live_tensors(model, adapter_name, cfg.bias)
    with torch.no_grad():
        for key, value in tensors.items():
            live[key].copy_(value.to(device=live[key].device, dtype=live[key].dtype))
    if is_trainable:
        set_trainable(model, adapter_name, cfg.bias)
    else:
        model.requires_grad_(False)
    return cfg
