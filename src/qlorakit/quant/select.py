"""Which layers of a model become 4-bit (and which LoRA wraps): module-name matching and layer selection.

One rule for "a module name matches a pattern": the name equals it, or ends with "." + it, so `lm_head`
matches `lm_head` and `mlp.down_proj` matches `model.layers.3.mlp.down_proj` but not `xmlp.down_proj`.
`quantize_model` (convert), `load_quantizing` (loading) and LoRA injection all use it.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def matches_suffix(name: str, patterns: Iterable[str]) -> bool:
    """True when `name` equals a pattern or ends with "." + pattern (a module-name suffix)."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def matching_patterns(name: str, patterns: Iterable[str]) -> list[str]:
    """The patterns `name` matches under `matches_suffix` (to report targets that matched nothing)."""
    return [p for p in patterns if matches_suffix(name, (p,))]


def conv1d_class() -> type | None:
    """transformers' GPT-2 style `Conv1D` (weight [in, out]), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_quantizable(module: nn.Module, conv1d: type | None) -> bool:
    """An exact nn.Linear or a Conv1D; subclasses (adapters, other 4-bit layers) are left alone, as
    transformers does."""
    return type(module) is nn.Linear or (conv1d is not None and isinstance(module, conv1d))


def as_linear(module: nn.Module, conv1d: type | None) -> nn.Linear:
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


def shared_weight_ids(model: nn.Module) -> set[int]:
    """ids of weights tied to an embedding or owned by more than one module: never quantized."""
    owners: dict[int, int] = {}
    embeddings: set[int] = set()
    for module in model.modules():
        for _, p in module.named_parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
        if isinstance(module, nn.Embedding):
            embeddings.add(id(module.weight))
    return embeddings | {pid for pid, n in owners.items() if n > 1}


def select_layers(model: nn.Module, skip: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(names of the layers `quantize_model` replaces, [(name, why kept)]): exact nn.Linear / Conv1D, not
    matching `skip`, weight not shared with an embedding or another module.

    Names only: holding module objects would keep every original weight alive until the end.
    """
    skip = tuple(skip)
    conv1d = conv1d_class()
    shared = shared_weight_ids(model)
    names, skipped = [], []
    for name, module in model.named_modules():
        if not is_quantizable(module, conv1d):
            continue
        if id(module.weight) in shared:
            skipped.append((name, "tied to an embedding"))
        elif matches_suffix(name, skip):
            skipped.append((name, "skipped"))
        else:
            names.append(name)
    return names, skipped


__all__ = [
    "as_linear",
    "conv1d_class",
    "is_quantizable",
    "matches_suffix",
    "matching_patterns",
    "select_layers",
    "shared_weight_ids",
]
