"""`qlorakit quantize`: quantize a model to 4 bits (NF4/FP4 + double quantization) and save the folder.

The folder is what transformers + bitsandbytes write for a 4-bit model, so
`AutoModelForCausalLM.from_pretrained(out)` loads it too. The command prints sizes before and after,
bits per parameter, per-layer and overall weight errors, and the perplexity on a built-in English
text before and after quantization.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlorakit.commands.options import add_overwrite_option
from qlorakit.config import QuantConfig
from qlorakit.core.errors import ConfigError
from qlorakit.core.outputs import OutputError, check_output
from qlorakit.models.resolve import DEFAULT_MODEL
from qlorakit.models.shape import estimated_bytes
from qlorakit.quant.settings import blocksize_problem
from qlorakit.tools.quantize import QuantizeJob, quantize_folder

COMPUTE_DTYPES = ("auto", "bfloat16", "float32")


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
    add_overwrite_option(parser, "qlorakit", "never the input model or a folder above it")
    parser.set_defaults(func=run)


def parse_args(args: argparse.Namespace) -> QuantizeJob:
    """Check every option, and raise one ConfigError listing all problems."""
    problems = []
    blocksize_error = blocksize_problem(args.blocksize)
    if blocksize_error is not None:
        problems.append(f"--blocksize {args.blocksize} {blocksize_error}")
    if args.max_length < 2:
        problems.append(f"--max-length {args.max_length} must be at least 2")
    plan = None
    try:  # the output rule of qlorakit.core.outputs, before anything is loaded
        need = estimated_bytes(args.model, 0.5)  # 4 bits per weight; a lower bound, so never a false alarm
        plan = check_output(
            Path(args.out), command="quantize", inputs=[args.model], overwrite=args.overwrite, need_bytes=need
        )
    except OutputError as exc:
        problems.append(str(exc))
    if problems or plan is None:
        raise ConfigError("qlorakit quantize: " + "; ".join(problems))
    quant = QuantConfig(
        quant_type=args.quant_type,
        blocksize=args.blocksize,
        double_quant=args.double_quant,
        compute_dtype=args.compute_dtype,
        skip=["lm_head"] if args.skip is None else list(args.skip),
    )
    return QuantizeJob(
        model=args.model,
        plan=plan,
        quant=quant,
        perplexity=args.perplexity,
        max_length=args.max_length,
        max_shard_size=args.max_shard_size,
    )


def run(args: argparse.Namespace) -> int:
    text = quantize_folder(parse_args(args))
    print(text, flush=True)
    return 0
