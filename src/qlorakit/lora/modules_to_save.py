"""Fully trained modules saved with the adapter (`modules_to_save`), kept as PEFT keeps them in memory.

The wrapper holds the frozen `original_module` and one trainable copy per adapter under
`modules_to_save.<adapter>`, so switching or disabling adapters restores the original module exactly and
the on-disk keys are `base_model.model.<path>.<param>` like PEFT's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qlorakit.core.errors import ConfigError


class ModulesToSaveWrapper(nn.Module):
    """`original_module` (frozen) + `modules_to_save[name]` (trainable copies); forward uses the active copy."""

    def __init__(self, module: nn.Module, adapter_name: str = "default") -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = adapter_name
        self._disabled = False
        self.train(module.training)
        self.add_adapter(adapter_name)

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ConfigError(f"modules_to_save already holds a copy for adapter {name!r}")
        self.original_module.requires_grad_(False)
        trainable = copy.deepcopy(self.original_module)
        trainable.requires_grad_(True)
        self.modules_to_save[name] = trainable

    def set_adapter(self, name: str) -> None:
        # An adapter without its own copy falls back to the original module (as PEFT does).
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]

    @property
    def disable_adapters(self) -> bool:
        return self._disabled

    @disable_adapters.setter
    def disable_adapters(self, value: bool) -> None:
        self._disabled = bool(value)

    def active_module(self) -> nn.Module:
        if self._disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        # Attribute reads (`weight`, `in_features`, `out_features`, ...) see the module forward would use,
        # so code that inspects e.g. `model.lm_head.weight` keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("original_module", "modules_to_save", "active_adapter"):
                raise
            return getattr(self.active_module(), name)
