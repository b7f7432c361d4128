"""`qlorakit compare [--methods full,lora,qlora,dora,ia3,prompt,prefix,adapter] [--max-steps N] CONFIG`.

Fine-tunes the config once per method, with the same data, seed and steps, each `qlorakit train` in its
own Python process so each run's peak memory is its own, then writes `<out>/report.md` (a table with a row
per method: trainable parameters, saved size, peak memory, step time, throughput, validation loss, exact
match, ROUGE-L, quantization drift; computed sentences) and PNG plots (loss curves, memory vs quality,
memory, speed). Without --methods: 16-bit LoRA and QLoRA.

  full      method=full, 16-bit base          lora     method=lora, quant.enabled=false
  qlora     method=lora, quant.enabled=true   dora     method=lora, lora.use_dora=true, 4-bit base
  ia3, prompt, prefix, adapter                method=<name>, the config's quant.enabled

Example: qlorakit compare configs/qlora-smollm2.yaml --methods lora,qlora,dora --max-steps 10
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qlorakit.commands.options import add_override_command, add_overwrite_option
from qlorakit.tools.compare_runs import compare_runs


def register(subparsers: Any) -> None:
    parser = add_override_command(
        subparsers,
        "compare",
        usage="qlorakit compare [-h] [--methods NAMES] [--max-steps N] [--out DIR] [--report-only] "
        "[--overwrite] CONFIG.yaml [--section.key=value ...]",
        help="fine-tune one config with several methods (default: 16-bit LoRA and QLoRA) and report "
        "memory, speed and quality",
        description=__doc__,
        run=run,
    )
    parser.add_argument("config", help="a YAML config file (as for qlorakit train)")
    parser.add_argument(
        "--methods",
        default=None,
        metavar="NAMES",
        help="comma-separated methods to compare, in report order (the first is the reference of the "
        "summary sentences): full, lora, qlora, dora, ia3, prompt, prefix, adapter (default: lora,qlora)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="optimizer steps of every run (= --train.max_steps=N), to keep the comparison short",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: the config's output.dir + '-compare')"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="do not train: rebuild the report from the runs already in --out",
    )
    add_overwrite_option(
        parser,
        "qlorakit compare",
        "never one holding the config, the model or the data",
        into="an --out folder",
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    print(
        compare_runs(
            args.config,
            list(args.overrides),
            out,
            methods=args.methods,
            max_steps=args.max_steps,
            report_only=args.report_only,
            overwrite=args.overwrite,
        )
    )
    return 0
