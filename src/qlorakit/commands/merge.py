"""`qlorakit merge`: fold a LoRA adapter into its base and write a plain model folder."""

from __future__ import annotations

import argparse
import sys

from qlorakit.commands.options import add_overwrite_option
from qlorakit.export.merge import merge_adapter


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge an adapter into its base model (16-bit HF folder)",
        description="Merge a LoRA/DoRA adapter into the base, layer by layer, and write a Hugging Face folder. "
        "The report compares the merged model's logits with the adapter on the 4-bit base.",
    )
    parser.add_argument(
        "model", help="the base model the adapter was trained on (folder, .gguf or built-in name)"
    )
    parser.add_argument("--adapter", required=True, help="the PEFT adapter folder")
    parser.add_argument("--out", required=True, help="the output folder (written whole at the end)")
    parser.add_argument(
        "--base",
        choices=("nf4", "original"),
        default="nf4",
        help="merge into the dequantized NF4 weights the adapter was trained against (default) "
        "or into the original 16-bit weights",
    )
    parser.add_argument(
        "--to",
        choices=("bf16", "fp16", "fp32", "nf4"),
        default="bf16",
        help="dtype of the merged weights; nf4 re-quantizes the merged model (changes its outputs)",
    )
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (e.g. 2GB, 500MB)")
    add_overwrite_option(parser, "qlorakit merge", "never the model's or the adapter's folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    if args.to == "nf4":
        print(
            "qlorakit merge: warning: --to nf4 re-quantizes the merged weights, so the result differs "
            "from the adapter on its 4-bit base; the drift is reported below",
            file=sys.stderr,
            flush=True,
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="re-quantizing")  # printed above and in the report
        report = merge_adapter(
            args.model,
            args.adapter,
            args.out,
            base=args.base,
            to=args.to,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
    print(report.summary())
    return 0
