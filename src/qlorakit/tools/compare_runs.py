"""`qlorakit compare`'s runs: fine-tuning methods on one config, each `qlorakit train` in its own process.

Every run trains the same data with the same seed, steps and tokens: the user's config and overrides,
then the method's own settings (`tools/compare_methods.py`: 16-bit LoRA is `--method=lora
--quant.enabled=false`, QLoRA the same with `true`, ...) and its folder under `--out`. A process each, so
each run's peak memory is its own. Then `qlorakit.tools.compare.write_report` turns the run folders into
`<out>/report.md` and the plots. Every check (the method names, the config as each run will see it, the
output folder, matplotlib) runs before the first training starts.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from qlorakit.config import load_config
from qlorakit.core.errors import ConfigError, QLoraKitError
from qlorakit.core.outputs import OutputPlan, check_output, claim_folder, disk_errors
from qlorakit.tools.compare import PLOTS, REPORT, conclusions, read_runs, write_report
from qlorakit.tools.compare_methods import CompareMethod, parse_methods
from qlorakit.tools.compare_plots import require_matplotlib
from qlorakit.train.recipe import resolve_compute_dtype


class CompareRunError(QLoraKitError):
    """One of the training processes failed; its own error message is printed above this one."""


def train_command(config: str, overrides: list[str], method: CompareMethod, out_dir: Path) -> list[str]:
    """The `qlorakit train` command line of one run (the user's overrides first, the run's own last)."""
    return [
        sys.executable,
        "-m",
        "qlorakit",
        "train",
        config,
        *overrides,
        *method.overrides(),
        f"--output.dir={out_dir}",
    ]


def run_overrides(overrides: list[str], max_steps: int | None) -> list[str]:
    """The user's overrides plus `--max-steps N` as `--train.max_steps=N` (one of the two, not both)."""
    if max_steps is None:
        return list(overrides)
    if max_steps < 1:
        raise ConfigError(f"--max-steps: must be a positive number of optimizer steps, got {max_steps}")
    given = [o for o in overrides if o.startswith("--train.max_steps=")]
    if given:
        raise ConfigError(f"--max-steps {max_steps} and {given[0]} both set the steps; keep one of them")
    return [*overrides, f"--train.max_steps={max_steps}"]


def check_compare(
    config: str,
    overrides: list[str],
    out: Path | None,
    overwrite: bool,
    methods: Sequence[CompareMethod] | None = None,
) -> OutputPlan:
    """Validate the config and overrides as every run will see them, and the output folder, before any
    training; `methods`: the runs (default: 16-bit LoRA and QLoRA)."""
    methods = parse_methods(None) if methods is None else methods
    reserved = {f"--{key}=" for m in methods for key in m.keys} | {"--output.dir="}
    clashes = [o for o in overrides if o.startswith(tuple(reserved))]
    if clashes:
        keys = ", ".join(sorted(r.strip("-=") for r in reserved))
        raise ConfigError(
            f"{', '.join(clashes)}: compare sets {keys} itself for each run; drop the override (use "
            "--methods to choose the runs and --out DIR for the output folder)"
        )
    cfg = load_config(config, overrides)
    for method in methods:
        load_config(config, [*overrides, *method.overrides()])
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
    require_matplotlib()  # fail now, not after the trainings, when matplotlib is missing
    for folder in folders.values():
        if folder.exists() and any(folder.iterdir()):
            raise ConfigError(
                f"{folder} already holds a run; choose another --out, delete that folder, or "
                "pass --report-only to rebuild the report from the runs there"
            )


def compare_runs(
    config: str,
    overrides: list[str],
    out: Path | None,
    *,
    methods: str | None = None,
    max_steps: int | None = None,
    report_only: bool = False,
    overwrite: bool = False,
) -> str:
    """Train one run per method of `methods` ("lora,qlora,dora"; None: 16-bit LoRA and QLoRA) unless
    `report_only`, and write the report; returns the closing message (the computed conclusions and where
    the report is)."""
    chosen = parse_methods(methods)
    overrides = run_overrides(overrides, max_steps)
    plan = check_compare(config, overrides, out, overwrite, chosen)
    folders = {m.name: plan.path / m.folder for m in chosen}
    commands = {m.label: train_command(config, overrides, m, folders[m.name]) for m in chosen}
    if not report_only:
        _check_fresh(folders)
    if not report_only or plan.path.is_dir():  # (--report-only without the folder fails reading the runs)
        claim_folder(plan, [m.folder for m in chosen] + [REPORT, *PLOTS.values()])
    if not report_only:
        for m in chosen:
            _run_one(commands[m.label], m.label)
    with disk_errors(plan):
        report = write_report(
            plan.path,
            *folders.values(),
            methods=chosen,
            commands=None if report_only else {label: shlex.join(c) for label, c in commands.items()},
            auto_dtype=auto_dtype(),
        )
    sentences = conclusions(read_runs(list(folders.values()), chosen))
    return "\n" + "".join(s + "\n" for s in sentences) + f"report: {report} (plots beside it)"


__all__ = ["CompareRunError", "check_compare", "compare_runs", "run_overrides", "train_command"]
