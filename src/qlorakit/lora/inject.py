"""Put LoRA adapters into a model: pick the target modules as PEFT does, wrap them, freeze the rest.

Module paths are kept (the wrapper holds the original as `base_layer`), so a Llama `q_proj` stays at
`model.layers.0.self_attn.q_proj` and the PEFT keys need no remapping.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from qlorakit.config import LoRAConfig, lora_regex_problems
from qlorakit.core.errors import ConfigError, ModelError
from qlorakit.lora.layer import LoRALinear
from qlorakit.lora.modules_to_save import ModulesToSaveWrapper
from qlorakit.quant.linear import Linear4bit
from qlorakit.quant.select import matches_suffix, matching_patterns

ALL_LINEAR = "all-linear"
# PEFT's default layer-index rule: the first numbered path segment, e.g. `model.layers.3.` or `transformer.h.3.`.
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


@dataclass
class InjectReport:
    targets: list[str]
    """Module paths that carry the adapter."""
    trainable: int
    total: int
    modules_to_save: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / self.total if self.total else 0.0
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {pct:.4f}"
        )


# ---------------------------------------------------------------------------------------------------------
# Walking the model


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`named_modules()` without the insides of LoRA / modules_to_save wrappers (they are never targets)."""
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        yield path, module
        if isinstance(module, LoRALinear | ModulesToSaveWrapper):
            inside.append(path)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Linear4bit | LoRALinear)


def output_head_path(model: nn.Module) -> str | None:
    """The path of the output head: `model.get_output_embeddings()` when the model has it, else `lm_head`."""
    names = {id(m): p for p, m in model.named_modules()}
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is not None:
        return names.get(id(head))
    return "lm_head" if "lm_head" in dict(model.named_modules()) else None


def layer_index(path: str) -> int | None:
    """The transformer block index of a module path (`model.layers.3.mlp.up_proj` -> 3), or None."""
    match = _LAYER_INDEX.match(path)
    return int(match.group("idx")) if match else None


def _excluded(path: str, exclude: str | list[str]) -> bool:
    if isinstance(exclude, str):  # a PEFT adapter_config may carry a regex here
        return re.fullmatch(exclude, path) is not None
    return matches_suffix(path, exclude)


def _under_modules_to_save(path: str, modules_to_save: list[str]) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in modules_to_save)


def pattern_value(patterns: dict[str, float], path: str, default: float) -> float:
    """PEFT's rank/alpha pattern rule: the first key that matches the end of the path (as a regex) wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _linear_suffixes(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(p.rsplit(".", 1)[-1] for p, m in _walk(model) if p and _is_linear(m)))


def select_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Module paths `cfg` targets, in model order (PEFT's matching rules); raises on no match or bad types."""
    problems = lora_regex_problems(cfg)  # an adapter_config.json can carry them too, not only a YAML file
    if problems:
        raise ConfigError("; ".join(problems))
    targets = cfg.target_modules
    head = output_head_path(model)
    if isinstance(targets, str) and targets != ALL_LINEAR and cfg.layers_to_transform is not None:
        raise ConfigError(
            "lora.layers_to_transform needs target_modules as a list of names or 'all-linear' "
            f"(with the regex {targets!r} PEFT ignores it); fold the layer numbers into the regex instead"
        )
    chosen: list[str] = []
    hit: set[str] = set()
    for path, module in _walk(model):
        if not path:
            continue
        if targets == ALL_LINEAR:
            matched = _is_linear(module) and path != head
        elif isinstance(targets, str):
            matched = re.fullmatch(targets, path) is not None
        else:
            found = matching_patterns(path, targets)
            hit.update(found)
            matched = bool(found)
        if (
            not matched
            or _excluded(path, cfg.exclude_modules)
            or _under_modules_to_save(path, cfg.modules_to_save)
        ):
            continue
        if cfg.layers_to_transform is not None and layer_index(path) not in cfg.layers_to_transform:
            continue
        if not _is_linear(module):
            raise ModelError(
                f"target module {path!r} is a {type(module).__module__}.{type(module).__name__}, which LoRA cannot "
                "wrap (only nn.Linear and 4-bit Linear4bit layers); narrow lora.target_modules"
            )
        chosen.append(path)
    linear = ", ".join(_linear_suffixes(model)) or "(none)"
    missing = [t for t in targets if t not in hit] if isinstance(targets, list) else []
    if missing:
        raise ModelError(
            f"lora.target_modules {missing} matched no module in the model; its linear layers are: {linear}"
        )
    if not chosen:
        raise ModelError(
            f"lora.target_modules {targets!r} selected no module (after exclude_modules/layers_to_transform); "
            f"the model's linear layers are: {linear}"
        )
    return chosen


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def _layer_seed(seed: int | None, path: str) -> int | None:
    # Each layer gets its own stream, fixed by (seed, path): the same weights whatever else is targeted.
    return None if seed is None else (seed * 1_000_003 + zlib.crc32(path.encode())) % (2**63)


# ---------------------------------------------------------------------------------------------------------
# Injection


def _check_ranks(cfg: LoRAConfig) -> None:
    if cfg.r <= 0:
        raise ConfigError(f"lora.r: must be a positive integer, got {cfg.r}")
    for key, rank in cfg.rank_pattern.items():
        if rank <= 0:
            raise ConfigError(f"lora.rank_pattern.{key}: must be a positive integer, got {rank}")


def modules_to_save_paths(model: nn.Module, names: list[str]) -> list[str]:
    """Paths of the modules `names` select (suffix on a dot boundary; a match inside another is dropped)."""
    found: list[str] = []
    for name in names:
        paths = [p for p, _ in _walk(model) if p and matches_suffix(p, [name])]
        if not paths:
            raise ModelError(f"lora.modules_to_save entry {name!r} matched no module in the model")
        found.extend(p for p in paths if p not in found and not any(p.startswith(w + ".") for w in found))
    return found


def _wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> list[str]:
    paths = modules_to_save_paths(model, names)
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, ModulesToSaveWrapper):
            module.add_adapter(adapter_name)
        else:
            _set_module(model, path, ModulesToSaveWrapper(module, adapter_name))
    return paths


def set_trainable(model: nn.Module, adapter_name: str, bias: str) -> None:
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            module.lora_A[adapter_name].requires_grad_(True)
            module.lora_B[adapter_name].requires_grad_(True)
            if adapter_name in module.lora_magnitude_vector:
                module.lora_magnitude_vector[adapter_name].requires_grad_(True)
            if bias == "lora_only" and module.base_layer.bias is not None:
                module.base_layer.bias.requires_grad_(True)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            module.modules_to_save[adapter_name].requires_grad_(True)
    if bias == "all":
        for _name, param in trainable_bias_params(model):
            param.requires_grad_(True)


def trainable_bias_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every bias of the model outside modules_to_save wrappers (those train as a whole), for `bias="all"`."""
    skip = [p for p, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    return [
        (name, param)
        for name, param in model.named_parameters()
        if (name == "bias" or name.endswith(".bias")) and not any(name.startswith(s + ".") for s in skip)
    ]


def inject_lora(
    model: nn.Module, cfg: LoRAConfig, *, adapter_name: str = "default", seed: int | None = None
) -> InjectReport:
    """Wrap the targeted linear layers of `model` in `LoRALinear` (in place), make the new adapter active,
    and freeze everything but its parameters (plus modules_to_save and biases as `cfg.bias` says)."""
    _check_ranks(cfg)
    if adapter_name in _adapter_names(model):
        raise ConfigError(f"adapter {adapter_name!r} is already in the model; pass another adapter_name")
    targets = select_targets(model, cfg)
    for path in targets:
        module = model.get_submodule(path)
        r = int(pattern_value(cfg.rank_pattern, path, cfg.r))
        alpha = float(pattern_value(cfg.alpha_pattern, path, cfg.alpha))
        kwargs = dict(r=r, alpha=alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, **kwargs, init=cfg.init, seed=_layer_seed(seed, path))
        else:
            layer = LoRALinear(
                module, adapter_name=adapter_name, **kwargs, init=cfg.init, seed=_layer_seed(seed, path)
            )
            _set_module(model, path, layer)
    saved = _wrap_modules_to_save(model, list(cfg.modules_to_save), adapter_name)
    set_active_adapter(model, adapter_name)
    set_trainable(model, adapter_name, cfg.bias)
    trainable, total = count_parameters(model)
    return InjectReport(targets=targets, trainable=trainable, total=total, modules_to_save=saved)


def _adapter_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, LoRALinear):
            names.update(module.lora_A.keys())
        elif isinstance(module, ModulesToSaveWrapper):
            names.update(module.modules_to_save.keys())
    return names


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit packed weight counts 2 parameters per byte."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(2 * m.packed.numel() for m in model.modules() if isinstance(m, Linear4bit))
    return trainable, total


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA-wrapped layer by module path."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the adapter every LoRA layer (and modules_to_save wrapper) uses."""
    if name not in _adapter_names(model):
        raise ConfigError(
            f"no adapter named {name!r} in the model (have: {', '.join(sorted(_adapter_names(model)))})"
        )
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.set_adapter(name, missing_ok=True)
        elif isinstance(module, ModulesToSaveWrapper):
            module.set_adapter(name)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes exactly its base outputs (merged adapters are unmerged)."""
    wrappers = [m for m in model.modules() if isinstance(m, LoRALinear | ModulesToSaveWrapper)]
    before = [m.disable_adapters for m in wrappers]
    try:
        for m in wrappers:
            m.disable_adapters = True
        yield model
    finally:
        for m, state in zip(wrappers, before, strict=True):
            m.disable_adapters = state


# ---------------------------------------------------------------------------------------------------------
# k-bit training preparation


def _upcast_norm(module: nn.Module) -> None:
    """Run `module` in fp32: fp32 parameters, fp32 input, output cast back to the input's dtype."""
    module.float()
    input_dtype: list[torch.dtype | None] = [None]  # set by the pre-hook; the post-hook sees the fp32 args

    def pre(_mod: nn.Module, args: tuple) -> tuple:
        input_dtype[0] = next((a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def post(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        dtype = input_dtype[0]
        return out if dtype is None or not torch.is_tensor(out) else out.to(dtype)

    module._qlorakit_input_dtype_hooks = (  # keep handles so the hooks can be removed
        module.register_forward_pre_hook(pre),
        module.register_forward_hook(post),
    )


def _computes_in_fp32(module: nn.Module) -> bool:
    # torch's fused norms accumulate half inputs in fp32; Hugging Face's RMSNorm/LayerNorm classes upcast
    # the hidden states to fp32 inside forward. Everything else called "*Norm" is assumed not to.
    if isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.RMSNorm):
        return True
    return type(module).__module__.startswith("transformers.") and type(module).__name__.endswith(
        ("RMSNorm", "LayerNorm")
    )


def prepare_for_kbit_training(model: nn.Module, *, gradient_checkpointing: bool) -> None:
    """QLoRA's model preparation, minus PEFT's blanket fp32 upcast.

    PEFT's `prepare_model_for_kbit_training` casts every fp16/bf16 parameter (embeddings, the output head,
    norms) to fp32. On a 16-bit base that doubles the embedding and head memory (often the largest 16-bit
    tensors left after 4-bit quantization) and makes the head matmul run in fp32, while the frozen
    embeddings and head gain nothing from it: they get no updates. What does need fp32 is the norm
    statistics, and most norms already compute them in fp32; only the remaining half-precision norms are
    moved to fp32 here (with their outputs cast back so downstream dtypes do not change).
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ModelError(
            f"prepare_for_kbit_training needs a Hugging Face PreTrainedModel, got {type(model).__name__}"
        )
    model.requires_grad_(False)
    for module in model.modules():
        if not type(module).__name__.endswith("Norm") and not isinstance(module, nn.LayerNorm | nn.GroupNorm):
            continue
        half = any(p.dtype in (torch.float16, torch.bfloat16) for p in module.parameters(recurse=False))
        if half and not _computes_in_fp32(module):
            _upcast_norm(module)
    model.config.use_cache = False
    if gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ModelError(
                f"{type(model).__name__} does not support gradient checkpointing; set train.gradient_checkpointing=false"
            )
        # Input grads let checkpointed blocks see a tensor that requires grad even though the embeddings
        # are frozen; non-reentrant checkpointing also handles frozen inputs and keyword arguments.
        model.enable_input_require_grads()
        kwargs = {"use_reentrant": False}
        if "activation_checkpointing_enable" in dir(
            type(model)
        ):  # transformers >= 5.x name (the old one warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
