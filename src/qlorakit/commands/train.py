"""`qlorakit train [CONFIG.yaml] [--section.key=value ...] [--resume]`.

With no arguments it fine-tunes the built-in default: `smollm2-135m` in NF4 + double quantization with
LoRA on every linear layer, on the built-in instruction dataset, into `runs/qlorakit-default`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

from qlorakit.commands.options import add_override_command, add_overwrite_option
from qlorakit.config import Config, load_config
from qlorakit.core.outputs import OutputPlan, disk_errors
from qlorakit.train.recipe import run_training


def _help_line(key: str, default: Any, f: dataclasses.Field) -> str:
    text = f"  --{key}={default!r}"
    doc = f.metadata.get("help")
    return text if doc is None else f"{text}\n        {doc}"


def config_help() -> str:
    """Every `--key` / `--section.key` with its default and the `help` of its field (from the config
    dataclasses)."""
    lines = ["configuration keys (YAML sections, or --section.key=value overrides):"]
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        if not dataclasses.is_dataclass(cls):  # a top-level key such as `method`
            lines.append(_help_line(section.name, section.default, section))
            continue
        default = cls()
        lines += [
            _help_line(f"{section.name}.{f.name}", getattr(default, f.name), f)
            for f in dataclasses.fields(cls)
        ]
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    parser = add_override_command(
        subparsers,
        "train",
        usage="qlorakit train [-h] [--resume] [--overwrite] [CONFIG.yaml] [--section.key=value ...]",
        help="fine-tune a LoRA adapter on a 4-bit base (QLoRA)",
        description=__doc__,
        epilog=config_help(),
        run=run,
    )
    parser.add_argument("config", nargs="?", help="a YAML config file (default: the built-in demo settings)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest valid checkpoint (= --train.resume=auto)",
    )
    add_overwrite_option(
        parser,
        "qlorakit train",
        "= --output.overwrite=true; never a folder holding the model or the data",
        into="an output.dir",
    )


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("--train.resume=auto")
    if args.overwrite:
        overrides.append("--output.overwrite=true")
    cfg = load_config(args.config, overrides)
    target = OutputPlan(Path(cfg.output.dir), "train", mode="update", label="output.dir")
    with disk_errors(target):  # a disk that fills up with checkpoints is a named error, not a traceback
        outcome = run_training(cfg)
    if outcome.stop_reason == "signal" and outcome.signal is not None:
        return 128 + outcome.signal
    return 0
