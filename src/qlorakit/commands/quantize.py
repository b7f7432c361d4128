"""`qlorakit quantize`: quantize a model to 4 bits (NF4/FP4 + double quantization) and save the folder.

The folder is what transformers + bitsandbytes write for a 4-bit model, so
`AutoModelForCausalLM.from_pretrained(out)` loads it too. The command prints sizes before and after,
bits per parameter, per-layer and overall weight errors, and the perplexity on a built-in English
text before and after quantization.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qlorakit.core.dtypes import format_bytes, parse_dtype
from qlorakit.core.errors import ConfigError
from qlorakit.core.outputs import OutputError, OutputPlan, check_output
from qlorakit.eval.perplexity import builtin_eval_text, perplexity
from qlorakit.models.resolve import DEFAULT_MODEL, is_quantized_folder, load_model, resolve_model_path
from qlorakit.models.shape import estimated_bytes
from qlorakit.quant.convert import quantize_model, save_quantized
from qlorakit.quant.report import format_report

COMPUTE_DTYPES = ("auto", "bfloat16", "float32")


@dataclass(frozen=True)
class QuantizeArgs:
    """The validated options of `qlorakit quantize`."""

    model: str
    out: Path
    quant_type: str
    blocksize: int
    double_quant: bool
    skip: tuple[str, ...]
    compute_dtype: torch.dtype | None
    perplexity: bool
    max_length: int
    max_shard_size: str
    overwrite: bool
    plan: OutputPlan


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a model to 4 bits and save a bitsandbytes-compatible folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"a Hugging Face folder, a .gguf file or a built-in name (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--out", required=True, type=Path, help="the 4-bit folder to write")
    parser.add_argument(
        "--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit code (default: nf4)"
    )
    parser.add_argument(
        "--blocksize",
        type=int,
        default=64,
        help="elements per absmax block: 32...4096, a power of two (default: 64)",
    )
    parser.add_argument(
        "--no-double-quant",
        dest="double_quant",
        action="store_false",
        help="keep the block absmax in fp32 instead of quantizing it to 8 bits (+0.37 bits per parameter)",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=None,
        metavar="NAME",
        help="module names or name suffixes to keep in full precision; replaces the default (lm_head); "
        "`--skip` alone quantizes every linear layer (weights tied to embeddings never are)",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        default="auto",
        help="dtype of the 4-bit layers' matmuls (auto: bfloat16 where the hardware runs it natively, else float32)",
    )
    parser.add_argument(
        "--no-perplexity", dest="perplexity", action="store_false", help="skip the before/after perplexity"
    )
    parser.add_argument(
        "--max-length", type=int, default=256, help="perplexity window in tokens (default: 256)"
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out even if qlorakit did not write it (never the input model or a folder above it)",
    )
    parser.set_defaults(func=run)


def parse_args(args: argparse.Namespace) -> QuantizeArgs:
    """Check every option, and raise one ConfigError listing all problems."""
    problems = []
    b = args.blocksize
    if not (32 <= b <= 4096 and b & (b - 1) == 0):
        problems.append(f"--blocksize {b} must be a power of two between 32 and 4096")
    if args.max_length < 2:
        problems.append(f"--max-length {args.max_length} must be at least 2")
    out = Path(args.out)
    plan = None
    try:  # the output rule of qlorakit.core.outputs, before anything is loaded
        need = estimated_bytes(args.model, 0.5)  # 4 bits per weight; a lower bound, so never a false alarm
        plan = check_output(
            out, command="quantize", inputs=[args.model], overwrite=args.overwrite, need_bytes=need
        )
    except OutputError as exc:
        problems.append(str(exc))
    if problems or plan is None:
        raise ConfigError("qlorakit quantize: " + "; ".join(problems))
    return QuantizeArgs(
        model=args.model,
        out=out,
        plan=plan,
        quant_type=args.quant_type,
        blocksize=b,
        double_quant=args.double_quant,
        skip=("lm_head",) if args.skip is None else tuple(args.skip),
        compute_dtype=None if args.compute_dtype == "auto" else parse_dtype(args.compute_dtype),
        perplexity=args.perplexity,
        max_length=args.max_length,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def quantize_command(opts: QuantizeArgs) -> str:
    """Load, measure, quantize, measure, save; returns the report text."""
    source = resolve_model_path(opts.model)
    if source.is_dir() and is_quantized_folder(source):
        raise ConfigError(f"{source} is already a 4-bit folder; quantize the original (16-bit) model instead")
    started = time.perf_counter()
    model, tokenizer = load_model(opts.model, dtype="auto")
    load_seconds = time.perf_counter() - started
    text = builtin_eval_text()
    before = perplexity(model, tokenizer, text, max_length=opts.max_length) if opts.perplexity else None
    report = quantize_model(
        model,
        skip=opts.skip,
        blocksize=opts.blocksize,
        quant_type=opts.quant_type,
        double_quant=opts.double_quant,
        compute_dtype=opts.compute_dtype,
    )
    after = perplexity(model, tokenizer, text, max_length=opts.max_length) if opts.perplexity else None
    save_quantized(model, tokenizer, opts.out, max_shard_size=opts.max_shard_size, plan=opts.plan)
    lines = [
        f"Loaded {opts.model} ({source}) in {load_seconds:.1f} s",
        format_report(
            report,
            perplexity_before=None if before is None else before.perplexity,
            perplexity_after=None if after is None else after.perplexity,
        ),
    ]
    if before is not None:
        lines.append(f"  perplexity measured on {before.tokens} tokens, windows of {opts.max_length}")
    lines.append(f"Wrote {opts.out} ({format_bytes(_folder_bytes(opts.out))} of weights)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    opts = parse_args(args)
    with torch.no_grad():
        text = quantize_command(opts)
    print(text, flush=True)
    return 0
