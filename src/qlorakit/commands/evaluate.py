"""`qlorakit eval`: loss, perplexity and generation metrics of a model (and adapter) on a dataset."""

from __future__ import annotations

import argparse

from qlorakit.commands.options import add_16bit_option, add_overwrite_option
from qlorakit.eval.evaluate import evaluate


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model/adapter on a dataset",
        description="Validation loss and perplexity on the response tokens (as in training), and exact match, "
        "BLEU and ROUGE-L of greedy generations against the reference answers.",
    )
    parser.add_argument("model", help="a Hugging Face folder, a .gguf file, or a built-in name")
    parser.add_argument("--adapter", default=None, help="a PEFT adapter folder")
    parser.add_argument("--data", required=True, help="a JSON/JSONL/text dataset file (or `builtin`)")
    parser.add_argument(
        "--format", dest="data_format", default="auto", choices=("auto", "alpaca", "chat", "sharegpt", "text")
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    parser.add_argument("--max-length", type=int, default=512, help="rows are cut at this many tokens")
    parser.add_argument("--template", choices=("auto", "chat", "alpaca", "text"), default="auto")
    parser.add_argument(
        "--compare-base", action="store_true", help="also score the base model (adapters off, no reload)"
    )
    add_16bit_option(parser)
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    add_overwrite_option(parser, "qlorakit eval", "never the model, adapter or data")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = evaluate(
        args.model,
        args.data,
        adapter=args.adapter,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        compare_base=args.compare_base,
        four_bit=not args.sixteen_bit,
        template=args.template,
        max_length=args.max_length,
        data_format=args.data_format,
        out=args.out,
        overwrite=args.overwrite,
    )
    print(
        f"evaluated {report.rows} rows of {report.data}"
        + (f" with {report.adapter}" if report.adapter else "")
    )
    print(report.table())
    for result in report.results:
        for sample in result.samples[:1]:
            print(f"[{result.label}] {sample['source']}: {sample['prediction'][:200]!r}")
    if args.out:
        print(f"wrote {args.out}")
    return 0
