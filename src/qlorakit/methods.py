"""The fine-tuning methods behind one interface: inject into a model, switch off, save, read and load.

Train, eval and export call these functions and never a method's own package, so adding a method is one
`Method` entry in `METHODS` (its package sits beside `lora/`). A training run picks its method from the
config's `method` key; a saved adapter folder names its method by `peft_type` in `adapter_config.json`
(PEFT's key), so folders PEFT wrote load here and the other way round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from qlorakit.config import Config
from qlorakit.core.errors import ConfigError, FormatError
from qlorakit.lora import inject as lora_inject
from qlorakit.lora import peft_format as lora_format


@dataclass(frozen=True)
class Method:
    """One fine-tuning method as the pipelines see it."""

    name: str
    """The config's `method` value."""
    peft_type: str
    """`peft_type` in adapter_config.json (PEFT's name of the method)."""
    inject: Callable[[nn.Module, Config, int], str]
    """(model, config, seed) -> a one-line report; makes only the method's parameters trainable."""
    disabled: Callable[[nn.Module], contextlib.AbstractContextManager[nn.Module]]
    """Within the block the model computes its base outputs."""
    save: Callable[[nn.Module, Path, Config], Path]
    """(model, out_dir, config) -> the folder written (PEFT's format)."""
    load: Callable[[nn.Module, Path, str], None]
    """(model, adapter_dir, adapter_name): add a saved adapter to a base model, active and frozen."""
    activate: Callable[[nn.Module, str], None]
    """(model, adapter_name): make one of the loaded adapters the active one."""
    check: Callable[[Path], None]
    """Read a saved adapter's config and fail (naming the file) before any model loads."""
    mergeable: bool
    """Whether `qlorakit merge` can fold it into the base weights."""


def _lora_inject(model: nn.Module, cfg: Config, seed: int) -> str:
    return str(lora_inject.inject_lora(model, cfg.lora, seed=seed))


def _lora_save(model: nn.Module, out_dir: Path, cfg: Config) -> Path:
    return lora_format.save_adapter(model, out_dir, cfg.lora, base_model_name_or_path=cfg.model.name)


def _lora_load(model: nn.Module, adapter_dir: Path, adapter_name: str) -> None:
    lora_format.load_adapter(model, adapter_dir, adapter_name=adapter_name)


METHODS: dict[str, Method] = {
    "lora": Method(
        name="lora",
        peft_type="LORA",
        inject=_lora_inject,
        disabled=lora_inject.disable_adapters,
        save=_lora_save,
        load=_lora_load,
        activate=lora_inject.set_active_adapter,
        check=lora_format.read_adapter_config,
        mergeable=True,
    ),
}


def method_of_config(cfg: Config) -> Method:
    """The method a training config asks for (`method`)."""
    try:
        return METHODS[cfg.method]
    except KeyError:  # the config's Literal already limits it; this guards a METHODS entry left out
        raise ConfigError(f"method: {cfg.method!r} is not available (known: {', '.join(METHODS)})") from None


def method_of_adapter(adapter_dir: str | Path) -> Method:
    """The method of a saved adapter folder, from `peft_type` in its adapter_config.json."""
    path = Path(adapter_dir) / lora_format.CONFIG_NAME
    data = lora_format.read_config_json(path)
    peft_type = str(data.get("peft_type", "LORA"))
    for method in METHODS.values():
        if method.peft_type == peft_type.upper():
            return method
    known = ", ".join(m.peft_type for m in METHODS.values())
    raise FormatError(f"{path}: peft_type {peft_type!r} is not supported (supported: {known})")


def check_adapter(adapter_dir: str | Path) -> Method:
    """Validate a saved adapter folder before any model loads; returns its method."""
    method = method_of_adapter(adapter_dir)
    method.check(Path(adapter_dir))
    return method


def load_adapter(model: nn.Module, adapter_dir: str | Path, adapter_name: str = "default") -> Method:
    """Add the saved adapter in `adapter_dir` (any supported method) to `model`; returns its method."""
    method = method_of_adapter(adapter_dir)
    method.load(model, Path(adapter_dir), adapter_name)
    return method


@contextlib.contextmanager
def base_only(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes its base outputs, whichever methods it carries."""
    with contextlib.ExitStack() as stack:
        for method in METHODS.values():
            stack.enter_context(method.disabled(model))
        yield model


__all__ = [
    "METHODS",
    "Method",
    "base_only",
    "check_adapter",
    "load_adapter",
    "method_of_adapter",
    "method_of_config",
]
