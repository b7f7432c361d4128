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

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlorakit.core.errors import ConfigError, FormatError
from qlorakit.core.outputs import GGUF_SIGNATURE, check_output, output_file
from qlorakit.export.gguf_tensors import (
    TensorPlan,
    convert_tensor,
    plan_tensors,
    read_tensors,
    rope_settings,
    tensor_bytes,
)
from qlorakit.export.gguf_vocab import add_tokenizer
from qlorakit.models.resolve import is_quantized_folder, resolve_model_path
from qlorakit.models.shape import estimated_bytes

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
DTYPES = ("f16", "bf16", "q8_0", "f32")
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType
_PARAM_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 int8 + one f16 scale
COMMAND = "export gguf"


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


def _add_metadata(writer: Any, cfg: dict[str, Any], model_dir: Path, dtype: str, n_vocab: int) -> None:
    n_head = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    theta, rope = rope_settings(cfg)
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
    plans = plan_tensors(model_dir, cfg, dtype)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_metadata(writer, cfg, model_dir, dtype, n_vocab)
    writer.add_string(GGUF_SIGNATURE, COMMAND)  # lets a later export recognise the file as its own
    add_tokenizer(writer, model_dir, n_vocab)
    for plan in plans:
        np_dtype, np_shape, nbytes = tensor_bytes(plan)
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
        for plan, tensor in read_tensors(plans, cfg):
            writer.write_tensor_data(convert_tensor(plan, cfg, tensor))
        writer.fout = None  # the handle belongs to output_file
    return _summary(plans, out_file, dtype, n_vocab, time.perf_counter() - start)


def _summary(
    plans: list[TensorPlan], out_file: Path, dtype: str, n_vocab: int, seconds: float
) -> GGUFSummary:
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


def export_gguf_checked(model: str, out: Path, dtype: str, overwrite: bool = False) -> Path:
    """Export a 16-bit HF folder to GGUF, pointing 4-bit and non-folder inputs to the right command."""
    source = resolve_model_path(model)
    if source.is_file():
        raise ConfigError(
            f"{model} is already a GGUF file; to change its dtype, export it with --format hf first"
        )
    if is_quantized_folder(source):
        raise ConfigError(
            f"{source} holds 4-bit weights; GGUF export needs 16-bit weights: run "
            f"`qlorakit export {model} --format hf --out DENSE_DIR` (or `qlorakit merge` for an adapter) first"
        )
    return export_gguf(source, out, dtype=dtype, overwrite=overwrite).path
