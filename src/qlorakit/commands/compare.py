"""`qlorakit compare CONFIG [--out DIR] [--section.key=value ...]`: 16-bit LoRA vs QLoRA on one config.

Runs `qlorakit train` twice with the same data, seed and steps, once with `--quant.enabled=false` (16-bit
base) and once with `--quant.enabled=true` (NF4 base), each in its own Python process so each run's peak
memory is its own, then writes `<out>/report.md` with a table, a computed conclusion and PNG plots.
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
        usage="qlorakit compare [-h] [--out DIR] [--report-only] [--overwrite] CONFIG.yaml [--section.key=value ...]",
        help="train 16-bit LoRA and QLoRA on the same config and report memory, speed and loss",
        description=__doc__,
        run=run,
    )
    parser.add_argument("config", help="a YAML config file (as for qlorakit train)")
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
            args.config, list(args.overrides), out, report_only=args.report_only, overwrite=args.overwrite
        )
    )
    return 0
