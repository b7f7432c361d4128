"""Quantization state of a 4-bit tensor, and its checkpoint keys (transformers + bitsandbytes layout).

A 4-bit linear at prefix `P.` is stored as `P.weight` (packed nibbles, uint8 [(n+1)//2, 1]) plus
`P.weight.absmax`, `P.weight.quant_map`, with double quantization `P.weight.nested_absmax` and
`P.weight.nested_quant_map`, and `P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): UTF-8 JSON as uint8.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from qlorakit.core.dtypes import FLOAT_DTYPES, dtype_name
from qlorakit.core.errors import CheckpointError, QuantizationError
from qlorakit.quant.codes import QUANT_TYPES, get_code
from qlorakit.quant.settings import BLOCKSIZES, blocksize_problem

# dtypes bitsandbytes accepts as `quant_storage` for the packed weight (read back as raw bytes)
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True, eq=False)
class NestedState:
    """Double quantization of the per-block absmax: 8-bit dynamic codes in blocks of `blocksize`.

    absmax: fp32 [ceil(nblocks / blocksize)] (absmax2); code: fp32 [256] (dynamic map);
    offset: the fp32 mean of the original absmax, as a Python float.
    """

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int = 256
    offset: float = 0.0
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True, eq=False)
class QuantState:
    """Everything besides the packed nibbles that dequantization needs.

    absmax: uint8 [nblocks] codes when `nested` is set, else fp32 [nblocks]; shape: the original shape;
    dtype: the original dtype; code: fp32 [16], the table of `quant_type`.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    nested: NestedState | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        _validate_state(self)

    @property
    def numel(self) -> int:
        """Number of quantized elements (product of `shape`)."""
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        """Number of `blocksize` blocks (the last one may be partial)."""
        return -(-self.numel // self.blocksize)

    def real_absmax(self) -> torch.Tensor:
        """fp32 [nblocks] per-block scale, undoing double quantization if any.

        `nested.code[absmax[i]] * nested.absmax[i // nested.blocksize] + offset`, rounded to fp32 after the
        product and after the sum, as bitsandbytes does.
        """
        nested = self.nested
        if nested is None:
            return self.absmax
        count = self.absmax.numel()
        nb = nested.absmax.numel()
        values = nested.code[self.absmax.to(torch.int64)]
        values = torch.nn.functional.pad(values, (0, nb * nested.blocksize - count))
        scaled = (values.view(nb, nested.blocksize) * nested.absmax.view(nb, 1)).reshape(-1)[:count]
        offset = torch.tensor(nested.offset, dtype=torch.float32, device=scaled.device)
        return scaled + offset

    def to(self, device: torch.device | str) -> QuantState:
        """A copy with every tensor on `device`."""
        nested = self.nested
        if nested is not None:
            nested = replace(nested, absmax=nested.absmax.to(device), code=nested.code.to(device))
        return replace(self, absmax=self.absmax.to(device), code=self.code.to(device), nested=nested)


def _validate_state(state: QuantState) -> None:
    """Internal consistency of a QuantState (metadata only, no device sync)."""
    problems = []
    if state.quant_type not in QUANT_TYPES:
        problems.append(f"quant_type {state.quant_type!r} is not one of {QUANT_TYPES}")
    if blocksize_problem(state.blocksize) is not None:
        problems.append(f"blocksize {state.blocksize!r} is not one of {BLOCKSIZES}")
    if state.dtype not in FLOAT_DTYPES.values():
        problems.append(f"dtype {state.dtype} is not one of {tuple(FLOAT_DTYPES)}")
    if len(state.shape) == 0 or any(d <= 0 for d in state.shape):
        problems.append(f"shape {tuple(state.shape)} must have at least one dimension, all positive")
    if tuple(state.code.shape) != (16,) or state.code.dtype != torch.float32:
        problems.append(f"code must be float32 [16], got {state.code.dtype} {list(state.code.shape)}")
    want = torch.uint8 if state.nested is not None else torch.float32
    if state.absmax.dtype != want or state.absmax.dim() != 1:
        problems.append(
            f"absmax must be a 1-D {want} tensor, got {state.absmax.dtype} {list(state.absmax.shape)}"
        )
    if not problems and state.absmax.numel() != state.nblocks:
        problems.append(f"absmax has {state.absmax.numel()} entries, expected {state.nblocks}")
    nested = state.nested
    if nested is not None and not problems:
        nb = -(-state.nblocks // nested.blocksize) if nested.blocksize > 0 else -1
        if nested.absmax.dtype != torch.float32 or tuple(nested.absmax.shape) != (nb,):
            problems.append(
                f"nested absmax must be float32 [{nb}], got {nested.absmax.dtype} {list(nested.absmax.shape)}"
            )
        if nested.code.dtype != torch.float32 or tuple(nested.code.shape) != (256,):
            problems.append(
                f"nested code must be float32 [256], got {nested.code.dtype} {list(nested.code.shape)}"
            )
    if problems:
        raise QuantizationError("inconsistent QuantState: " + "; ".join(problems))


def _state_json(state: QuantState) -> dict[str, object]:
    """The non-tensor fields, in the order and spelling of bitsandbytes `QuantState.as_dict`."""
    fields: dict[str, object] = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": dtype_name(state.dtype),
        "shape": list(state.shape),
    }
    if state.nested is not None:
        fields["nested_blocksize"] = state.nested.blocksize
        fields["nested_dtype"] = dtype_name(state.nested.dtype)
        fields["nested_offset"] = state.nested.offset
    return fields


def state_to_tensors(prefix: str, packed: torch.Tensor, state: QuantState) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one 4-bit weight, keyed `f"{prefix}weight..."` (prefix used verbatim, e.g.
    "model.layers.0.self_attn.q_proj.").

    Equal key by key (dtype, shape, bytes) to `{prefix}weight` + bitsandbytes `QuantState.as_dict(packed=True)`.
    """
    w = f"{prefix}weight"
    out = {w: packed, f"{w}.absmax": state.absmax, f"{w}.quant_map": state.code}
    if state.nested is not None:
        out[f"{w}.nested_absmax"] = state.nested.absmax
        # a separate copy: safetensors refuses tensors that share memory
        out[f"{w}.nested_quant_map"] = state.nested.code.clone()
    blob = json.dumps(_state_json(state)).encode("utf-8")
    out[f"{w}.quant_state.bitsandbytes__{state.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
    return out


def _get(tensors: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{source}: missing key {key!r} of a 4-bit bitsandbytes weight")
    value = tensors[key]
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{source}: key {key!r} is a {type(value).__name__}, expected a tensor")
    return value


def _expect(tensor: torch.Tensor, key: str, source: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise CheckpointError(
            f"{source}: key {key!r} must be {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)} "
            "(the file is corrupt or does not match its quant_state JSON)"
        )


def _read_json(tensor: torch.Tensor, key: str, source: str) -> dict:
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise CheckpointError(
            f"{source}: key {key!r} must be 1-D uint8 UTF-8 JSON, got {tensor.dtype} {list(tensor.shape)}"
        )
    try:
        meta = json.loads(bytes(tensor.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source}: key {key!r} does not hold valid UTF-8 JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: key {key!r} must hold a JSON object, got {type(meta).__name__}")
    return meta


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_meta(meta: dict, key: str, source: str, quant_type: str) -> dict:
    """Validate the JSON fields; returns them with dtypes resolved."""

    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{source}: key {key!r}: field {field!r} {why} (got {meta.get(field)!r})")

    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise bad(field, "is missing")
    if meta["quant_type"] != quant_type:
        raise bad("quant_type", f"must be {quant_type!r}, as the key name says")
    if blocksize_problem(meta["blocksize"]) is not None:
        raise bad("blocksize", f"must be one of {BLOCKSIZES}")
    if meta["dtype"] not in FLOAT_DTYPES:
        raise bad("dtype", f"must be one of {tuple(FLOAT_DTYPES)}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not shape or not all(_is_int(d) and d > 0 for d in shape):
        raise bad("shape", "must be a non-empty list of positive integers")
    parsed = {
        "blocksize": meta["blocksize"],
        "dtype": FLOAT_DTYPES[meta["dtype"]],
        "shape": torch.Size(shape),
    }
    nested_fields = ("nested_blocksize", "nested_dtype", "nested_offset")
    present = [f for f in nested_fields if f in meta]
    if present and len(present) != len(nested_fields):
        missing = sorted(set(nested_fields) - set(present))
        raise bad(missing[0], "is missing while other nested_* fields are present")
    if present:
        nbs = meta["nested_blocksize"]
        if not _is_int(nbs) or nbs <= 0 or nbs & (nbs - 1):
            raise bad("nested_blocksize", "must be a positive power of two")
        if meta["nested_dtype"] != "float32":
            raise bad("nested_dtype", "must be 'float32'")
        off = meta["nested_offset"]
        if isinstance(off, bool) or not isinstance(off, int | float) or not math.isfinite(off):
            raise bad("nested_offset", "must be a finite number")
        parsed.update(nested_blocksize=nbs, nested_offset=float(off))
    return parsed


def _read_packed(tensors: Mapping[str, torch.Tensor], key: str, source: str, numel: int) -> torch.Tensor:
    packed = _get(tensors, key, source)
    nbytes = (numel + 1) // 2
    ok_shape = packed.dim() == 1 or (packed.dim() == 2 and packed.shape[1] == 1)
    if (
        packed.dtype not in _STORAGE_DTYPES
        or not ok_shape
        or packed.numel() * packed.element_size() != nbytes
    ):
        raise CheckpointError(
            f"{source}: key {key!r} must hold {nbytes} bytes of packed 4-bit values (uint8 [{nbytes}, 1]) for "
            f"{numel} elements, got {packed.dtype} {list(packed.shape)} (shape in the quant_state JSON and "
            "packed size disagree, or the weight is not 4-bit)"
        )
    # a non-uint8 `quant_storage` only reinterprets the same bytes
    return packed.contiguous().reshape(-1).view(torch.uint8).reshape(nbytes, 1)


def state_from_tensors(
    prefix: str, tensors: Mapping[str, torch.Tensor], source: str = "<tensors>"
) -> tuple[torch.Tensor, QuantState]:
    """Read one 4-bit weight written by `state_to_tensors` or by transformers + bitsandbytes.

    Returns `(packed uint8 [(n+1)//2, 1], QuantState)`; blocksize, dtype and shape come from the JSON.
    Any missing or inconsistent key raises CheckpointError naming `source` and the key.
    """
    w = f"{prefix}weight"
    found = [t for t in QUANT_TYPES if f"{w}.quant_state.bitsandbytes__{t}" in tensors]
    if not found:
        raise CheckpointError(
            f"{source}: missing key {w + '.quant_state.bitsandbytes__nf4'!r} (or __fp4): {w!r} is not a "
            "pre-quantized 4-bit bitsandbytes weight"
        )
    if len(found) > 1:
        raise CheckpointError(f"{source}: both nf4 and fp4 quant_state keys exist for {w!r}; keep one")
    quant_type = found[0]
    qs_key = f"{w}.quant_state.bitsandbytes__{quant_type}"
    meta = _parse_meta(_read_json(_get(tensors, qs_key, source), qs_key, source), qs_key, source, quant_type)
    numel = math.prod(meta["shape"])
    nblocks = -(-numel // meta["blocksize"])
    packed = _read_packed(tensors, w, source, numel)
    nested_keys = [k for k in (f"{w}.nested_absmax", f"{w}.nested_quant_map") if k in tensors]
    is_nested = "nested_blocksize" in meta
    if nested_keys and not is_nested:
        raise CheckpointError(
            f"{source}: key {nested_keys[0]!r} exists but {qs_key!r} has no nested_* fields"
        )
    absmax = _get(tensors, f"{w}.absmax", source)
    _expect(absmax, f"{w}.absmax", source, torch.uint8 if is_nested else torch.float32, (nblocks,))
    code = _get(tensors, f"{w}.quant_map", source)
    _expect(code, f"{w}.quant_map", source, torch.float32, (16,))
    if not torch.equal(code.cpu(), get_code(quant_type)):
        raise CheckpointError(
            f"{source}: key {w + '.quant_map'!r} differs from the standard {quant_type} table"
        )
    nested = None
    if is_nested:
        nbs = meta["nested_blocksize"]
        absmax2 = _get(tensors, f"{w}.nested_absmax", source)
        _expect(absmax2, f"{w}.nested_absmax", source, torch.float32, (-(-nblocks // nbs),))
        code2 = _get(tensors, f"{w}.nested_quant_map", source)
        _expect(code2, f"{w}.nested_quant_map", source, torch.float32, (256,))
        nested = NestedState(absmax=absmax2, code=code2, blocksize=nbs, offset=meta["nested_offset"])
    state = QuantState(
        absmax=absmax,
        shape=meta["shape"],
        dtype=meta["dtype"],
        blocksize=meta["blocksize"],
        quant_type=quant_type,
        code=code,
        nested=nested,
    )
    return packed, state
