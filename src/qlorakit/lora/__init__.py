"""LoRA adapters (plain, rsLoRA, DoRA) on plain and 4-bit linear layers, in PEFT's on-disk format."""

from qlorakit.lora.inject import (
    InjectReport,
    count_parameters,
    disable_adapters,
    inject_lora,
    lora_layers,
    prepare_for_kbit_training,
    set_active_adapter,
)
from qlorakit.lora.layer import LoRALinear, delta_weight, lora_scaling
from qlorakit.lora.modules_to_save import ModulesToSaveWrapper
from qlorakit.lora.peft_format import load_adapter, read_adapter_config, save_adapter

__all__ = [
    "InjectReport",
    "LoRALinear",
    "ModulesToSaveWrapper",
    "count_parameters",
    "delta_weight",
    "disable_adapters",
    "inject_lora",
    "load_adapter",
    "lora_layers",
    "lora_scaling",
    "prepare_for_kbit_training",
    "read_adapter_config",
    "save_adapter",
    "set_active_adapter",
]
