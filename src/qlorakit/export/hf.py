"""Plain 16-bit Hugging Face folders: sharded safetensors + config + tokenizer, written atomically.

`ShardWriter` takes tensors one at a time and writes a shard as soon as it is full, so a caller that
produces weights layer by layer never holds more than one shard of the output in memory. The file
layout matches `PreTrainedModel.save_pretrained`: `model.safetensors` when everything fits in one
shard, else `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`.

`dense_tensors` walks a qlorakit model (4-bit layers, LoRA wrappers) and yields the tensors of a plain
checkpoint of its original architecture, one layer at a time.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlorakit.config import QuantConfig
from qlorakit.core.dtypes import parse_dtype, parse_size
from qlorakit.core.errors import ModelError
from qlorakit.core.outputs import check_output, output_folder
from qlorakit.lora.layer import LoRALinear, base_weight, merge_lora_weight
from qlorakit.lora.modules_to_save import ModulesToSaveWrapper
from qlorakit.models.load import load_base
from qlorakit.models.shape import estimated_bytes
from qlorakit.quant.linear import Linear4bit

DTYPES = ("bf16", "fp16", "fp32")
"""Output dtypes of a dense export, by their command-line names (read with `qlorakit.core.dtypes.parse_dtype`)."""


@dataclass
class ShardSummary:
    """What `ShardWriter.finish` wrote."""

    files: list[str]
    total_size: int
    """Bytes of tensor data (the index's `metadata.total_size`)."""
    weight_map: dict[str, str]
    peak_buffer_bytes: int
    """The most tensor bytes the writer held in memory at once (its pending shard)."""
    numel: int
    """Number of elements written (parameters and persistent buffers)."""


@dataclass
class ShardWriter:
    """Collect `(name, tensor)` pairs into safetensors shards of at most `max_shard_bytes` each.

    Tensors are cast to `dtype` (floating point only) and copied to the CPU on `add`; a tensor larger
    than the limit gets a shard of its own, as in `save_pretrained`.
    """

    folder: Path
    max_shard_bytes: int
    dtype: torch.dtype
    _pending: dict[str, torch.Tensor] = field(default_factory=dict)
    _pending_bytes: int = 0
    _written: list[tuple[str, list[str]]] = field(default_factory=list)
    _total: int = 0
    _peak: int = 0
    _numel: int = 0
    _names: set[str] = field(default_factory=set)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")  # internal invariant of the callers
        self._names.add(name)
        if tensor.is_floating_point():
            tensor = tensor.to(device="cpu", dtype=self.dtype)
        else:
            tensor = tensor.to(device="cpu")
        tensor = tensor.detach().contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self._total += size
        self._numel += tensor.numel()
        self._peak = max(self._peak, self._pending_bytes)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        part = f".part-{len(self._written) + 1:05d}.safetensors"
        save_file(self._pending, str(self.folder / part), metadata={"format": "pt"})
        self._written.append((part, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finish(self) -> ShardSummary:
        """Write the last shard, give the shards their final names and write the index when sharded."""
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        weight_map: dict[str, str] = {}
        files = []
        for i, (part, names) in enumerate(self._written, start=1):
            final = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            (self.folder / part).rename(self.folder / final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return ShardSummary(files, self._total, weight_map, self._peak, self._numel)


def export_config(config: Any, dtype: torch.dtype) -> Any:
    """A copy of a `PretrainedConfig` for a plain dense checkpoint: no quantization, `dtype` recorded."""
    cfg = copy.deepcopy(config)
    if "quantization_config" in vars(cfg):
        delattr(cfg, "quantization_config")
    cfg.dtype = dtype
    return cfg


def write_hf_files(
    folder: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    config: Any,
    tokenizer: Any | None,
    dtype: torch.dtype,
    max_shard_size: int | str = "2GB",
    generation_config: Any | None = None,
) -> ShardSummary:
    """Write a loadable HF model folder into `folder` (an existing, usually temporary, folder).

    `tensors` is consumed lazily: each tensor may be freed by its producer once it has been added.
    Callers make the folder atomic with `qlorakit.core.outputs.output_folder`.
    """
    writer = ShardWriter(folder, parse_size(max_shard_size, "max shard size"), dtype)
    for name, tensor in tensors:
        writer.add(name, tensor)
    summary = writer.finish()
    export_config(config, dtype).save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return summary


# ---------------------------------------------------------------------------------------------------------
# Dense tensors of a (4-bit, LoRA-wrapped) model, in the original architecture's key layout


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense fp32 weight [out, in] and bias of a linear-like layer, with the active adapter merged.

    Explicit dispatch: LoRALinear (merge its active adapter unless disabled or already merged in place),
    Linear4bit (dequantize), nn.Linear (as is).
    """
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

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(export_config(config, torch.float32))


def _resolve(model: nn.Module, path: str) -> nn.Module:
    """`model.get_submodule(path)`, seeing through `ModulesToSaveWrapper` (its active copy)."""
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


@dataclass
class HFExportReport:
    out_dir: Path
    files: list[str]
    total_size: int
    dtype: torch.dtype


def export_hf(
    model_spec: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bf16",
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
) -> HFExportReport:
    """Write any model qlorakit loads (HF folder, 4-bit folder, .gguf) as a plain 16-bit HF folder.

    4-bit weights are dequantized one layer at a time while they are written. `out_dir` follows the
    output rule of `qlorakit.core.outputs` (checked before the model is loaded; `overwrite` replaces a folder
    qlorakit did not write, never the input).
    """
    torch_dtype = parse_dtype(dtype)
    parse_size(max_shard_size, "max shard size")
    need = estimated_bytes(model_spec, torch.finfo(torch_dtype).bits / 8)
    plan = check_output(
        out_dir, command="export hf", inputs=[model_spec], overwrite=overwrite, need_bytes=need
    )
    # Full precision in memory whatever the device prefers: the only rounding is the final cast.
    model, tokenizer = load_base(model_spec, four_bit=False, quant=QuantConfig(compute_dtype="float32"))
    with output_folder(plan) as tmp:
        summary = write_hf_files(
            tmp,
            dense_tensors(model),
            config=model.config,
            tokenizer=tokenizer,
            dtype=torch_dtype,
            max_shard_size=max_shard_size,
            generation_config=model.generation_config,
        )
    return HFExportReport(Path(out_dir), summary.files, summary.total_size, torch_dtype)
