"""Write a Hugging Face Llama folder as a GGUF file, in the layout llama.cpp's convert_hf_to_gguf.py writes.

What makes the file llama.cpp's:
- metadata keys `llama.*` (block count, context, widths, heads, rope base and dimension, RMS epsilon),
  `general.file_type`, `general.quantization_version`, and the tokenizer under `tokenizer.ggml.*`;
- tensor names from gguf-py's tensor map (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output`
  unless the embeddings are tied);
- q_proj / k_proj rows permuted: Hugging Face stores each head's rotary pairs as two halves
  (x[:d/2], x[d/2:]), llama.cpp as interleaved pairs, so rows (head, half, i) become (head, i, half);
- 1-D tensors and norms in f32 whatever the file type; q8_0 falls back to f16 for a tensor whose rows are
  not a multiple of 32 values, as llama.cpp does.

Tensors are streamed one at a time from the safetensors files: the header and tensor table are written
from shapes alone, then each tensor is read, converted and appended. The file is written beside the
target and renamed into place (`qlorakit.core.outputs.output_file`), so a failed export leaves any earlier file
untouched; the key `qlorakit.output` marks the file as this command's, the only kind it replaces unasked.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlorakit.core.errors import FormatError
from qlorakit.core.outputs import GGUF_SIGNATURE, check_output, output_file
from qlorakit.models.shape import estimated_bytes

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
DTYPES = ("f16", "bf16", "q8_0", "f32")
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType
_PARAM_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 int8 + one f16 scale
COMMAND = "export gguf"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class GGUFSummary:
    """What was written: `tensor_types` counts tensors per GGML type name."""

    path: Path
    dtype: str
    architecture: str
    n_tensors: int
    n_params: int
    file_bytes: int
    vocab_size: int
    seconds: float
    tensor_types: dict[str, int] = field(default_factory=dict)


def permute_qk(weight: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's row permutation of q_proj (n_head_kv None) or k_proj weights, shape `[n_head*d, in]`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"cannot read {path}: {exc}; export needs a Hugging Face model folder") from exc
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise FormatError(
            f"{path}: architecture {archs[0]} cannot be exported to GGUF; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return cfg


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any]]:
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
    import torch

    theta, rope = _rope(cfg)
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


def _pre_tokenizer_name(model_dir: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, from its pre-tokenizer."""
    path = model_dir / "tokenizer.json"
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(
            f"cannot read {path}: {exc}; GGUF export needs a fast (tokenizer.json) tokenizer"
        ) from exc
    model_type = (tok.get("model") or {}).get("type")
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if model_type != "BPE" or "ByteLevel" not in kinds:
        raise FormatError(
            f"{path}: tokenizer {model_type} with pre-tokenizer {kinds} is not byte-level BPE; "
            "GGUF export supports gpt2-style byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM, Qwen2)"
        )
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        if regex == PRETOKENIZE_REGEX:
            return "qwen2"
    raise FormatError(f"{path}: pre-tokenizer {pre} has no llama.cpp equivalent known to qlorakit")


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in (
        "<pad>",
        "<mask>",
        "<unk>",
        "<s>",
        "</s>",
    )


def _vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types as llama.cpp's get_vocab_base: ids the tokenizer lacks become UNUSED `[PADi]`."""
    from gguf import TokenType
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special or _looks_special(token)
            types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(token)
    return tokens, types


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
class _Plan:
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


def _plan(model_dir: Path, cfg: dict[str, Any], dtype: str) -> list[_Plan]:
    from gguf import MODEL_ARCH, get_tensor_name_map
    from safetensors import safe_open

    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, int(cfg["num_hidden_layers"]))
    plans: list[_Plan] = []
    if _rope(cfg)[1]["rope_type"] == "llama3":
        n = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]) // 2
        plans.append(
            _Plan("rope_freqs.weight", None, None, (n,), _out_type("rope_freqs.weight", (n,), "f32"))
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
                plans.append(_Plan(gguf_name, hf_name, file, shape, _out_type(gguf_name, shape, dtype)))
    return plans


def _add_metadata(writer: Any, cfg: dict[str, Any], model_dir: Path, dtype: str, n_vocab: int) -> None:
    n_head = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    theta, rope = _rope(cfg)
    writer.add_type("model")
    writer.add_name(
        str(cfg.get("_name_or_path") or model_dir.name).rstrip("/").split("/")[-1] or model_dir.name
    )
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(cfg.get("num_key_value_heads") or n_head))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if head_dim != int(cfg["hidden_size"]) // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(_FILE_TYPES[dtype])
    writer.add_vocab_size(n_vocab)
    writer.add_rope_dimension_count(head_dim)
    if rope["rope_type"] == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_quantization_version(2)  # gguf.GGML_QUANT_VERSION


def _add_tokenizer(writer: Any, model_dir: Path, n_vocab: int) -> None:
    import gguf

    pre = _pre_tokenizer_name(model_dir)
    tokens, types = _vocab(model_dir, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise FormatError(f"{model_dir / 'tokenizer.json'} has no BPE merges; cannot write a gpt2 tokenizer")
    special.add_to_gguf(writer, quiet=True)


def _tensor_bytes(plan: _Plan) -> tuple[Any, tuple[int, ...], int]:
    """(numpy dtype, numpy shape, nbytes) of the tensor as it will be written."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape

    n = math.prod(plan.shape)
    if plan.qtype == Q.F32:
        return np.float32, plan.shape, n * 4
    if plan.qtype == Q.F16:
        return np.float16, plan.shape, n * 2
    byte_shape = quant_shape_to_byte_shape(plan.shape, plan.qtype)
    return np.uint8, byte_shape, int(np.prod(byte_shape))


def _convert(plan: _Plan, cfg: dict[str, Any], tensor: Any) -> Any:
    """The numpy array to write for one tensor: permuted (q/k), cast or quantized."""
    import numpy as np
    import torch
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


def _tensors(plans: list[_Plan], cfg: dict[str, Any]) -> Iterator[tuple[_Plan, Any]]:
    """Each planned tensor, read one at a time (files are opened once each, lazily)."""
    from safetensors import safe_open

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


def export_gguf(
    model_dir: str | Path, out_file: str | Path, *, dtype: str = "f16", overwrite: bool = False
) -> GGUFSummary:
    """Write the Llama folder `model_dir` (config.json, safetensors, tokenizer.json) as the GGUF `out_file`.

    `dtype`: f16 (default), bf16, q8_0 or f32 for the 2-D weights; norms and 1-D tensors are f32.
    `out_file` follows the output rule of `qlorakit.core.outputs`: it replaces only a GGUF this command wrote
    (its `qlorakit.output` key), or any file with `overwrite`; never a folder or the input.
    """
    import gguf
    from gguf.gguf_writer import WriterState

    start = time.perf_counter()
    model_dir, out_file = Path(model_dir), Path(out_file)
    if dtype not in DTYPES:
        raise FormatError(f"unknown GGUF dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    need = estimated_bytes(model_dir, _PARAM_BYTES[dtype])
    target = check_output(
        out_file,
        command=COMMAND,
        kind="file",
        inputs=[model_dir],
        overwrite=overwrite,
        need_bytes=need,
        suffix=".gguf",
    )
    cfg = _read_config(model_dir)
    n_vocab = int(cfg["vocab_size"])
    plans = _plan(model_dir, cfg, dtype)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_metadata(writer, cfg, model_dir, dtype, n_vocab)
    writer.add_string(GGUF_SIGNATURE, COMMAND)  # lets a later export recognise the file as its own
    _add_tokenizer(writer, model_dir, n_vocab)
    for plan in plans:
        np_dtype, np_shape, nbytes = _tensor_bytes(plan)
        unquantized = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        raw = None if plan.qtype in unquantized else plan.qtype
        writer.add_tensor_info(plan.gguf_name, np_shape, np_dtype, nbytes, raw_dtype=raw)
    with output_file(target) as fh:
        # The writer streams into our handle (what its open_output_file does with a path of its own), so
        # the file appears only once every tensor is written; output_file flushes, fsyncs and closes it.
        writer.fout, writer.state = [fh], WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan, tensor in _tensors(plans, cfg):
            writer.write_tensor_data(_convert(plan, cfg, tensor))
        writer.fout = None  # the handle belongs to output_file
    return _summary(plans, out_file, dtype, n_vocab, time.perf_counter() - start)


def _summary(plans: list[_Plan], out_file: Path, dtype: str, n_vocab: int, seconds: float) -> GGUFSummary:
    types: dict[str, int] = {}
    n_params = 0
    for plan in plans:
        types[plan.qtype.name] = types.get(plan.qtype.name, 0) + 1
        if plan.hf_name is not None:  # generated tensors (rope_freqs) are not model parameters
            n_params += math.prod(plan.shape)
    return GGUFSummary(
        path=out_file,
        dtype=dtype,
        architecture="llama",
        n_tensors=len(plans),
        n_params=n_params,
        file_bytes=out_file.stat().st_size,
        vocab_size=n_vocab,
        seconds=seconds,
        tensor_types=types,
    )
