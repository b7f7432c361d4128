"""Options several commands share, declared once so their flags and wording cannot drift apart."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_override_command(
    subparsers: Any,
    name: str,
    *,
    usage: str,
    help: str,
    description: str | None,
    run: Callable[[argparse.Namespace], int],
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """The parser of a command that takes `--section.key=value` config overrides.

    `overrides=[]` in its defaults is what tells `qlorakit.cli` to accept them; the description is the
    module doc, kept as written (it holds examples and lists).
    """
    parser = subparsers.add_parser(
        name,
        usage=usage,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run, overrides=[])
    return parser


def add_overwrite_option(
    parser: argparse.ArgumentParser, writer: str, never: str, *, into: str | None = None
) -> None:
    """`--overwrite`, the one way past the output rule of `qlorakit.core.outputs`.

    `writer` is who the help says wrote the folder (`qlorakit merge`). Without `into` the command
    replaces `--out`; with it (a folder the command writes into, such as `an output.dir`) it adds to that
    folder. `never` names what stays protected even so.
    """
    if into is None:
        text = f"replace --out even if {writer} did not write it ({never})"
    else:
        text = f"write into {into} that holds files {writer} did not write ({never})"
    parser.add_argument("--overwrite", action="store_true", help=text)


def add_16bit_option(parser: argparse.ArgumentParser) -> None:
    """`--16bit`: commands that load a model for inference load its base in NF4 unless told otherwise."""
    parser.add_argument(
        "--16bit",
        dest="sixteen_bit",
        action="store_true",
        help="keep the base in 16 bits (default: 4-bit NF4)",
    )
