"""`qlorakit export`: convert a model folder to GGUF, a 16-bit HF folder, or a 4-bit bitsandbytes folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from qlorakit.commands.options import add_overwrite_option
from qlorakit.core.errors import ConfigError
from qlorakit.export import gguf, hf
from qlorakit.export.bnb4 import export_bnb4
from qlorakit.export.gguf import export_gguf_checked
from qlorakit.export.hf import export_hf

FORMATS = ("gguf", "hf", "bnb4")
DTYPES = {"gguf": gguf.DTYPES, "hf": hf.DTYPES, "bnb4": ()}
DEFAULT_DTYPE = {"gguf": "f16", "hf": "bf16"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="convert a model to GGUF, a 16-bit HF folder or a 4-bit folder",
        description="gguf: a llama.cpp file from a 16-bit HF folder (merge adapters first with `qlorakit merge`); "
        "hf: a plain 16-bit safetensors folder (from a 4-bit folder, a .gguf, ...); "
        "bnb4: a pre-quantized 4-bit folder that transformers + bitsandbytes load.",
    )
    parser.add_argument("model", help="a Hugging Face folder, a .gguf file, or a built-in name")
    parser.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--out", required=True, help="the output file (gguf) or folder (hf, bnb4)")
    parser.add_argument(
        "--dtype", default=None, help="gguf: f16|bf16|q8_0|f32 (f16); hf: bf16|fp16|fp32 (bf16)"
    )
    parser.add_argument("--max-shard-size", default="2GB", help="hf: largest safetensors shard")
    add_overwrite_option(parser, "qlorakit export", "never the input or a folder above it")
    parser.set_defaults(func=run)


def check_export_args(model: str, fmt: str, dtype: str | None) -> str | None:
    """Validate the format/dtype pair and the input kind before anything is loaded; return the dtype."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; supported formats: {', '.join(FORMATS)}")
    path = Path(model)
    if (path / "adapter_config.json").is_file():
        raise ConfigError(
            f"{model} is a LoRA adapter folder, not a model; merge it into its base first: "
            f"`qlorakit merge BASE_MODEL --adapter {model} --out MERGED_DIR`, then export MERGED_DIR"
        )
    if fmt == "bnb4":
        if dtype is not None:
            raise ConfigError(
                "--dtype does not apply to --format bnb4 (weights are NF4, the rest keeps its dtype)"
            )
        return None
    dtype = dtype or DEFAULT_DTYPE[fmt]
    if dtype not in DTYPES[fmt]:
        raise ConfigError(f"--dtype {dtype!r} for --format {fmt}: must be one of {', '.join(DTYPES[fmt])}")
    return dtype


def run(args: argparse.Namespace) -> int:
    dtype = check_export_args(args.model, args.format, args.dtype)
    out = Path(args.out)
    if args.format == "gguf":
        export_gguf_checked(args.model, out, dtype, overwrite=args.overwrite)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {dtype})")
    elif args.format == "hf":
        report = export_hf(
            args.model, out, dtype=dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite
        )
        print(f"wrote {out}: {', '.join(report.files)} ({report.total_size / 2**20:.1f} MiB, {dtype})")
    else:
        export_bnb4(args.model, out, overwrite=args.overwrite)
        print(f"wrote {out} (4-bit NF4 with double quantization; loads with transformers + bitsandbytes)")
    return 0
