"""Reading model checkpoints into 4-bit models without holding a full-precision copy.

`load_quantized` reads a bitsandbytes 4-bit HF folder (written by qlorakit or transformers) as stored.
`load_quantizing` reads a full-precision HF folder and quantizes each linear layer as soon as its weight is
read: the model is built with parameters on the meta device, then filled tensor by tensor, so peak memory
is the 4-bit model plus the full-precision embeddings/norms plus one layer's weight, instead of the whole
model in the compute dtype (for a 168M Llama in fp32: ~0.4 GB instead of ~0.9 GB). The result is the
model `from_pretrained(dtype=compute_dtype)` + `quantize_model` give, tensor for tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlorakit.core.errors import CheckpointError, QuantizationError
from qlorakit.quant.convert import STATE_KEY_MARK, quantize_layer
from qlorakit.quant.linear import Linear4bit, default_compute_dtype
from qlorakit.quant.select import as_linear, conv1d_class, is_quantizable, select_layers
from qlorakit.quant.settings import QuantSettings
from qlorakit.quant.state import state_from_tensors


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init cost); buffers stay real, so the
    non-persistent ones (rotary inv_freq) are computed as usual."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """tensor key -> safetensors file, for a single file or a sharded checkpoint with an index."""
    from safetensors import safe_open

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map): {exc}") from exc
        files = {key: folder / name for key, name in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise CheckpointError(f"{index} lists shard {path.name}, which is missing from {folder}")
        return files
    if single.is_file():
        try:
            with safe_open(single, framework="pt") as fh:
                return dict.fromkeys(fh.keys(), single)
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{single} is not a readable safetensors file: {exc}") from exc
    raise CheckpointError(f"{folder} has no model.safetensors (nor model.safetensors.index.json)")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class _Reader:
    """Reads tensors by key from the checkpoint's safetensors files, each opened once.

    Plain positioned reads, not a memory map: mapped checkpoint pages count in the process's resident set
    until the file is closed (a 1 GB checkpoint adds up to 1 GB to peak RSS while it is read), while read
    pages only live in the kernel's page cache. Unusual dtypes (fp8 ...) and big-endian hosts go through
    the safetensors library.
    """

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self._stack = contextlib.ExitStack()
        self._open: dict[Path, tuple[Any, int, dict[str, Any]]] = {}
        self._mapped: dict[Path, Any] = {}

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def header(self, path: Path) -> dict[str, Any]:
        """The JSON header of one file (tensor name -> dtype, shape, offsets)."""
        return self._file(path)[2]

    def _file(self, path: Path) -> tuple[Any, int, dict[str, Any]]:
        if path not in self._open:
            fh = self._stack.enter_context(open(path, "rb"))  # noqa: SIM115 (closed by the stack)
            try:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
            except (struct.error, ValueError) as exc:
                raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
            self._open[path] = (fh, 8 + length, header)
        return self._open[path]

    def get(self, key: str) -> torch.Tensor:
        path = self.files[key]
        fh, data_start, header = self._file(path)
        entry = header.get(key)
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: tensor {key!r} is listed in the index but not in the file")
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None or sys.byteorder != "little":
            return self._library_get(path, key)
        begin, end = entry["data_offsets"]
        data = torch.empty(end - begin, dtype=torch.uint8)
        fh.seek(data_start + begin)
        if fh.readinto(data.numpy()) != end - begin:
            raise CheckpointError(f"{path} is truncated: tensor {key!r} ends past the end of the file")
        return data.view(dtype).reshape(entry["shape"])

    def _library_get(self, path: Path, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if path not in self._mapped:
            self._mapped[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._mapped[path].get_tensor(key)


# Keys that exist only for a 4-bit weight: any one of them marks `P.weight` as 4-bit, so a folder that lost
# one key (say the quant_state) is reported as missing that key, not as holding unexpected ones.
_4BIT_SUFFIXES = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map")


def _quantized_prefixes(keys: Sequence[str]) -> list[str]:
    """ "P." for every 4-bit weight: a `P.weight.quant_state.bitsandbytes__<type>` key or its companions."""
    found = {k[: k.index(STATE_KEY_MARK) + 1] for k in keys if STATE_KEY_MARK in k}
    for key in keys:
        for suffix in _4BIT_SUFFIXES:
            if key.endswith(suffix):
                found.add(key[: -len(suffix) + 1])
    return sorted(found)


def _check_shapes(model: nn.Module, reader: _Reader, keys: Sequence[str]) -> None:
    """CheckpointError naming the first tensor whose stored shape is not the one the model's config needs."""
    state = model.state_dict()  # parameters on the meta device: shapes only
    for key in keys:
        if key not in state:
            continue
        path = reader.files[key]
        entry = reader.header(path).get(key)
        stored = list(entry.get("shape", [])) if isinstance(entry, dict) else None
        if stored is not None and stored != list(state[key].shape):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {stored}, but the model built from config.json needs "
                f"{list(state[key].shape)}; the weights do not match config.json (re-save the model, or "
                "restore the config.json that belongs to these weights)"
            )


def check_checkpoint_shapes(folder: str | os.PathLike[str]) -> None:
    """Compare every tensor of a full-precision safetensors folder with the shapes its config.json implies
    (headers only, no weights read); CheckpointError naming the first mismatch."""
    folder = Path(folder)
    files = _checkpoint_files(folder)
    model = _build_skeleton(folder)
    with _Reader(files) as reader:
        _check_shapes(model, reader, sorted(files))


def _swap_in_4bit(model: nn.Module, prefix: str, reader: _Reader, compute_dtype: torch.dtype) -> None:
    conv1d = conv1d_class()
    name = prefix[:-1]
    source = str(reader.files[next(k for k in reader.files if k.startswith(f"{prefix}weight."))])
    try:
        module = model.get_submodule(name)
    except AttributeError as exc:
        raise CheckpointError(
            f"{source}: 4-bit weight {prefix}weight has no module {name!r} in the model"
        ) from exc
    if not is_quantizable(module, conv1d):
        raise CheckpointError(f"{source}: {prefix}weight is 4-bit but {name} is a {type(module).__name__}")
    tensors = {k: reader.get(k) for k in reader.files if k.startswith(f"{prefix}weight")}
    packed, state = state_from_tensors(prefix, tensors, source=source)
    linear = as_linear(module, conv1d)
    expected = (linear.out_features, linear.in_features)
    if tuple(state.shape) != expected:
        raise CheckpointError(
            f"{source}: {prefix}weight has shape {list(state.shape)}, the model expects {list(expected)}"
        )
    bias = None
    if module.bias is not None:
        if f"{prefix}bias" not in reader.files:
            raise CheckpointError(f"{source}: missing key {prefix}bias (the model's {name} has a bias)")
        bias = reader.get(f"{prefix}bias")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, Linear4bit(packed, state, bias, compute_dtype))


def _build_skeleton(folder: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    qconfig = config.__dict__.pop("quantization_config", None)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    if qconfig is not None:
        model.config.quantization_config = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    return model


def _check_keys(model: nn.Module, files: dict[str, Path], prefixes: list[str], folder: Path) -> list[str]:
    """The non-4-bit keys to load; CheckpointError for a missing or unexpected one."""
    in_4bit = tuple(prefixes)
    expected = {k for k in model.state_dict() if not k.startswith(in_4bit)}
    present = {k for k in files if not k.startswith(in_4bit)}
    tied = set(model.all_tied_weights_keys)
    ignore = [re.compile(p) for p in (model._keys_to_ignore_on_load_unexpected or [])]
    missing = sorted(expected - present - tied)
    unexpected = sorted(k for k in present - expected if not any(p.search(k) for p in ignore))
    if missing:
        raise CheckpointError(
            f"{files[next(iter(files))] if files else folder}: missing key {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + " that the model needs; the checkpoint does not match its config.json"
        )
    if unexpected:
        raise CheckpointError(
            f"{files[unexpected[0]]}: unexpected key {unexpected[0]!r}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + " that the model has no place for; the checkpoint does not match its config.json"
        )
    return sorted(present & expected)


def _finish(model: nn.Module, folder: Path) -> nn.Module:
    """Tie weights, check that nothing is left on the meta device, take the generation config; eval mode."""
    from transformers import GenerationConfig

    model.tie_weights()
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if p.is_meta:
            raise CheckpointError(f"{folder}: nothing in the checkpoint fills {name!r}")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.eval()
    return model


def load_quantized(
    folder: str | os.PathLike[str],
    compute_dtype: torch.dtype | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a bitsandbytes 4-bit HF folder (written by qlorakit or transformers) on the CPU, in eval mode.

    The 4-bit weights are used as stored (never re-quantized). compute_dtype None picks the best for
    the CPU; dtype casts the full-precision tensors (None keeps the checkpoint's dtypes).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a model folder: config.json is missing")
    compute_dtype = compute_dtype if compute_dtype is not None else default_compute_dtype("cpu")
    files = _checkpoint_files(folder)
    prefixes = _quantized_prefixes(list(files))
    if not prefixes:
        raise CheckpointError(
            f"{folder} holds no 4-bit weights (no '*{STATE_KEY_MARK}*' keys); load it as a full-precision model"
        )
    model = _build_skeleton(folder)
    with _Reader(files) as reader:
        for prefix in prefixes:
            _swap_in_4bit(model, prefix, reader, compute_dtype)
        keys = _check_keys(model, files, prefixes, folder)
        _check_shapes(model, reader, keys)
        rest = {}
        for key in keys:
            t = reader.get(key)
            rest[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    model.load_state_dict(rest, strict=False, assign=True)
    return _finish(model, folder)


def _fill(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the (meta) parameter or buffer `key`, keeping its requires_grad."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = tensor


def load_quantizing(folder: str | os.PathLike[str], settings: QuantSettings) -> nn.Module | None:
    """Load a full-precision HF folder quantizing as it reads (see the module doc); eval mode, CPU.

    `settings.compute_dtype` must be set: every tensor is cast to it as `from_pretrained(dtype=...)`
    would, and the layers `quantize_model(model, settings)` would quantize are quantized from it, one
    at a time. Returns None when the folder's tensor names are not exactly the model's (a checkpoint that
    needs transformers' key conversions): callers then use from_pretrained + quantize_model.
    """
    compute_dtype = settings.compute_dtype
    if compute_dtype is None:
        raise QuantizationError(
            "load_quantizing needs settings.compute_dtype (the dtype of the weights read)"
        )
    folder = Path(folder)
    files = _checkpoint_files(folder)
    if any(STATE_KEY_MARK in k for k in files):
        raise QuantizationError(f"{folder} is already 4-bit; load it with load_quantized")
    model = _build_skeleton(folder)
    try:
        keys = _check_keys(model, files, [], folder)
    except CheckpointError:
        return None
    with _Reader(files) as reader:
        _check_shapes(model, reader, keys)
        quantized, _ = select_layers(model, settings.skip)
        for name in quantized:
            for attr in ("weight", "bias"):
                if f"{name}.{attr}" in files:
                    _fill(model, f"{name}.{attr}", reader.get(f"{name}.{attr}").to(compute_dtype))
            quantize_layer(model, name, settings, compute_dtype)
        done = tuple(f"{n}." for n in quantized)
        for key in keys:
            if not key.startswith(done):
                t = reader.get(key)
                _fill(model, key, t.to(compute_dtype) if t.is_floating_point() else t)
    return _finish(model, folder)


__all__ = ["check_checkpoint_shapes", "load_quantized", "load_quantizing"]
