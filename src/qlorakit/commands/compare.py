"""`qlorakit compare CONFIG [--out DIR] [--section.key=value ...]`: 16-bit LoRA vs QLoRA on one config.

Runs `qlorakit train` twice with the same data, seed and steps, once with `--quant.enabled=false` (16-bit
base) and once with `--quant.enabled=true` (NF4 base), each in its own Python process so each run's peak
memory is its own, then writes `<out>/report.md` with a table, a computed conclusion and PNG plots.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from qlorakit.config import load_config
from qlorakit.core.errors import ConfigError, QLoraKitError
from qlorakit.core.outputs import OutputPlan, check_output, claim_folder, disk_errors
from qlorakit.models.load import resolve_compute_dtype
from qlorakit.tools.compare import PLOTS, REPORT, conclusion, read_run, require_matplotlib, write_report

# (folder name, report label, quant.enabled)
RUNS = (("lora16", "16-bit LoRA", False), ("qlora", "QLoRA", True))
_RESERVED = ("--quant.enabled=", "--output.dir=")


class CompareRunError(QLoraKitError):
    """One of the two training processes failed; its own error message is printed above this one."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compare",
        usage="qlorakit compare [-h] [--out DIR] [--report-only] [--overwrite] CONFIG.yaml [--section.key=value ...]",
        help="train 16-bit LoRA and QLoRA on the same config and report memory, speed and loss",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out folder that holds files qlorakit compare did not write "
        "(never one holding the config, the model or the data)",
    )
    parser.set_defaults(func=run, overrides=[])


def train_command(config: str, overrides: list[str], quant: bool, out_dir: Path) -> list[str]:
    """The `qlorakit train` command line of one run (the user's overrides first, the run's own last)."""
    return [
        sys.executable,
        "-m",
        "qlorakit",
        "train",
        config,
        *overrides,
        f"--quant.enabled={'true' if quant else 'false'}",
        f"--output.dir={out_dir}",
    ]


def _check(config: str, overrides: list[str], out: Path | None, overwrite: bool) -> OutputPlan:
    """Validate the config, the overrides for both runs and the output folder before any training."""
    clashes = [o for o in overrides if o.startswith(_RESERVED)]
    if clashes:
        raise ConfigError(
            f"{', '.join(clashes)}: compare sets quant.enabled and output.dir itself for each run; "
            "drop the override (use --out DIR for the output folder)"
        )
    cfg = load_config(config, overrides)
    for _, _, quant in RUNS:
        load_config(config, [*overrides, f"--quant.enabled={'true' if quant else 'false'}"])
    inputs = [config, cfg.model.name, cfg.data.val_path, *(spec.path for spec in cfg.data.datasets)]
    target = out if out is not None else Path(f"{cfg.output.dir}-compare")
    return check_output(target, command="compare", mode="update", inputs=inputs, overwrite=overwrite)


def _run_one(command: list[str], label: str) -> None:
    print(f"== {label}: {shlex.join(command)}", flush=True)
    proc = subprocess.Popen(command)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the child too: let it save its checkpoint and stop (a second Ctrl-C aborts both)
        proc.wait()
        raise
    if code != 0:
        raise CompareRunError(
            f"the {label} run failed (exit status {code}); its error is printed above. Command: "
            f"{shlex.join(command)}"
        )


def _auto_dtype() -> str:
    """What `quant.compute_dtype: auto` means for a single-process run on this machine."""
    import torch

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return str(resolve_compute_dtype("auto", device)).removeprefix("torch.")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    plan = _check(args.config, overrides, Path(args.out) if args.out else None, args.overwrite)
    out = plan.path
    folders = {name: out / name for name, _, _ in RUNS}
    commands = {
        label: train_command(args.config, overrides, quant, folders[name]) for name, label, quant in RUNS
    }
    if not args.report_only:
        require_matplotlib()  # fail now, not after two trainings, when matplotlib is missing
        for name, _, _ in RUNS:
            if folders[name].exists() and any(folders[name].iterdir()):
                raise ConfigError(
                    f"{folders[name]} already holds a run; choose another --out, delete that folder, or "
                    "pass --report-only to rebuild the report from the runs there"
                )
    if not args.report_only or out.is_dir():  # (--report-only without the folder fails reading the runs)
        claim_folder(plan, [*folders, REPORT, *PLOTS.values()])
    if not args.report_only:
        for _, label, _ in RUNS:
            _run_one(commands[label], label)
    with disk_errors(plan):
        report = write_report(
            out,
            folders["lora16"],
            folders["qlora"],
            commands=None if args.report_only else {label: shlex.join(c) for label, c in commands.items()},
            auto_dtype=_auto_dtype(),
        )
    lora, qlora = read_run(folders["lora16"], RUNS[0][1]), read_run(folders["qlora"], RUNS[1][1])
    print(f"\n{conclusion(lora, qlora)}\nreport: {report} (plots beside it)")
    return 0
