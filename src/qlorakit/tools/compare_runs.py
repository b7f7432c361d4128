"""`qlorakit compare`'s runs: 16-bit LoRA vs QLoRA on one config, each `qlorakit train` in its own process.

The two trainings use the same data, seed and steps, once with `--quant.enabled=false` (16-bit base) and
once with `--quant.enabled=true` (NF4 base); a process each, so each run's peak memory is its own. Then
`qlorakit.tools.compare.write_report` turns the two run folders into `<out>/report.md` and the plots.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import torch

from qlorakit.config import load_config
from qlorakit.core.errors import ConfigError, QLoraKitError
from qlorakit.core.outputs import OutputPlan, check_output, claim_folder, disk_errors
from qlorakit.tools.compare import PLOTS, REPORT, conclusion, read_run, require_matplotlib, write_report
from qlorakit.train.recipe import resolve_compute_dtype

# (folder name, report label, quant.enabled)
RUNS = (("lora16", "16-bit LoRA", False), ("qlora", "QLoRA", True))
_RESERVED = ("--quant.enabled=", "--output.dir=")


class CompareRunError(QLoraKitError):
    """One of the two training processes failed; its own error message is printed above this one."""


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


def check_compare(config: str, overrides: list[str], out: Path | None, overwrite: bool) -> OutputPlan:
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


def auto_dtype() -> str:
    """What `quant.compute_dtype: auto` means for a single-process run on this machine."""
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return str(resolve_compute_dtype("auto", device)).removeprefix("torch.")


def _check_fresh(folders: dict[str, Path]) -> None:
    require_matplotlib()  # fail now, not after two trainings, when matplotlib is missing
    for folder in folders.values():
        if folder.exists() and any(folder.iterdir()):
            raise ConfigError(
                f"{folder} already holds a run; choose another --out, delete that folder, or "
                "pass --report-only to rebuild the report from the runs there"
            )


def compare_runs(
    config: str, overrides: list[str], out: Path | None, *, report_only: bool = False, overwrite: bool = False
) -> str:
    """Train both runs (unless `report_only`) and write the report; returns the closing message
    (the computed conclusion and where the report is)."""
    plan = check_compare(config, overrides, out, overwrite)
    folders = {name: plan.path / name for name, _, _ in RUNS}
    commands = {label: train_command(config, overrides, quant, folders[name]) for name, label, quant in RUNS}
    if not report_only:
        _check_fresh(folders)
    if not report_only or plan.path.is_dir():  # (--report-only without the folder fails reading the runs)
        claim_folder(plan, [*folders, REPORT, *PLOTS.values()])
    if not report_only:
        for _, label, _ in RUNS:
            _run_one(commands[label], label)
    with disk_errors(plan):
        report = write_report(
            plan.path,
            folders["lora16"],
            folders["qlora"],
            commands=None if report_only else {label: shlex.join(c) for label, c in commands.items()},
            auto_dtype=auto_dtype(),
        )
    lora, qlora = read_run(folders["lora16"], RUNS[0][1]), read_run(folders["qlora"], RUNS[1][1])
    return f"\n{conclusion(lora, qlora)}\nreport: {report} (plots beside it)"


__all__ = ["RUNS", "CompareRunError", "check_compare", "compare_runs", "train_command"]
