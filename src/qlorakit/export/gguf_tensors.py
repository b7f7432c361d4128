"""The tensor part of a GGUF file: llama.cpp's tensor names, types and layouts for a Hugging Face Llama.

Names come from gguf-py's tensor map (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output`); q_proj
and k_proj rows are permuted from Hugging Face's two rotary halves per head to llama.cpp's interleaved
pairs; 1-D tensors and norms stay f32, and q8_0 falls back to f16 for rows that are not a multiple of 32.
A plan (name, source, shape, type) is made for every tensor from the headers alone, so the GGUF header can
be written before any tensor is read; `read_tensors` then streams them one at a time.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from qlorakit.core.errors import FormatError


def permute_qk(weight: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's row permutation of q_proj (n_head_kv None) or k_proj weights, shape `[n_head*d, in]`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def rope_settings(cfg: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope base, scaling dict) from transformers 5 `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise FormatError(f"rope type {kind!r} is not exported to GGUF; supported: default, linear, llama3")
    merged["rope_type"] = kind
    return theta, merged


def llama3_rope_factors(cfg: dict[str, Any]) -> Any:
    """The `rope_freqs.weight` tensor llama.cpp writes for llama3 rope scaling: one divisor per frequency,
    shape `[head_dim / 2]`, fp32."""
    theta, rope = rope_settings(cfg)
    dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FormatError(
            f"{model_dir} has no model.safetensors(.index.json); save the model with safetensors"
        )
    return [single]


@dataclass
class TensorPlan:
    gguf_name: str
    hf_name: str | None  # None: a generated tensor (rope_freqs)
    file: Path | None
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType


def _out_type(gguf_name: str, shape: tuple[int, ...], dtype: str) -> Any:
    from gguf import GGMLQuantizationType as Q

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32  # llama.cpp keeps 1-D tensors and norms in f32
    if dtype == "q8_0":
        return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[dtype]


def plan_tensors(model_dir: Path, cfg: dict[str, Any], dtype: str) -> list[TensorPlan]:
    from gguf import MODEL_ARCH, get_tensor_name_map

    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, int(cfg["num_hidden_layers"]))
    plans: list[TensorPlan] = []
    if rope_settings(cfg)[1]["rope_type"] == "llama3":
        n = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]) // 2
        plans.append(
            TensorPlan("rope_freqs.weight", None, None, (n,), _out_type("rope_freqs.weight", (n,), "f32"))
        )
    tied = bool(cfg.get("tie_word_embeddings", False))
    for file in _safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as fh:
            for hf_name in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                    continue  # recomputed by llama.cpp / the tied embedding is written once
                gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise FormatError(
                        f"{file}: tensor {hf_name} has no llama.cpp name; is this a plain Llama?"
                    )
                shape = tuple(fh.get_slice(hf_name).get_shape())
                plans.append(TensorPlan(gguf_name, hf_name, file, shape, _out_type(gguf_name, shape, dtype)))
    return plans


def tensor_bytes(plan: TensorPlan) -> tuple[Any, tuple[int, ...], int]:
    """(numpy dtype, numpy shape, nbytes) of the tensor as it will be written."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape

    n = math.prod(plan.shape)
    if plan.qtype == Q.F32:
        return np.float32, plan.shape, n * 4
    if plan.qtype == Q.F16:
        return np.float16, plan.shape, n * 2
    byte_shape = quant_shape_to_byte_shape(plan.shape, plan.qtype)
    return np.uint8, byte_shape, int(np.prod(byte_shape))


def convert_tensor(plan: TensorPlan, cfg: dict[str, Any], tensor: Any) -> Any:
    """The numpy array to write for one tensor: permuted (q/k), cast or quantized."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    n_head = int(cfg["num_attention_heads"])
    if plan.hf_name is not None and plan.hf_name.endswith("q_proj.weight"):
        tensor = permute_qk(tensor, n_head, n_head)
    elif plan.hf_name is not None and plan.hf_name.endswith("k_proj.weight"):
        tensor = permute_qk(tensor, n_head, int(cfg.get("num_key_value_heads") or n_head))
    if plan.qtype == Q.F32:
        return tensor.to(torch.float32).contiguous().numpy()
    if plan.qtype == Q.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    if plan.qtype == Q.BF16:
        bits = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        return bits.view(np.uint8).reshape(*plan.shape[:-1], plan.shape[-1] * 2)
    return quantize(tensor.to(torch.float32).contiguous().numpy(), Q.Q8_0)


def read_tensors(plans: list[TensorPlan], cfg: dict[str, Any]) -> Iterator[tuple[TensorPlan, Any]]:
    """Each planned tensor, read one at a time (files are opened once each, lazily)."""
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for plan in plans:
            if plan.hf_name is None:
                yield plan, llama3_rope_factors(cfg)
                continue
            assert plan.file is not None
            if plan.file not in handles:
                handles[plan.file] = stack.enter_context(safe_open(str(plan.file), framework="pt"))
            yield plan, handles[plan.file].get_tensor(plan.hf_name)


__all__ = [
    "TensorPlan",
    "convert_tensor",
    "llama3_rope_factors",
    "permute_qk",
    "plan_tensors",
    "read_tensors",
    "rope_settings",
    "tensor_bytes",
]
