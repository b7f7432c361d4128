"""The `qlorakit` command line: one subcommand per pipeline, no logic of its own.

Each subcommand lives in `qlorakit.commands.<name>` and exposes `register(subparsers)`, which adds
its parser and sets `func=run`. Modules are imported lazily so `qlorakit --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from qlorakit.core.errors import QLoraKitError
from qlorakit.core.memory import configure_allocator

#: Commands that compute nothing with tensors: no allocator set-up (it may compile the C++ library).
_NO_TENSORS = frozenset({"estimate"})

# name -> module; order is the order shown in --help.
COMMANDS: dict[str, str] = {
    "train": "qlorakit.commands.train",
    "quantize": "qlorakit.commands.quantize",
    "generate": "qlorakit.commands.generate",
    "chat": "qlorakit.commands.chat",
    "merge": "qlorakit.commands.merge",
    "export": "qlorakit.commands.export",
    "eval": "qlorakit.commands.evaluate",
    "estimate": "qlorakit.commands.estimate",
    "compare": "qlorakit.commands.compare",
}


# `--section.key=value` config overrides; argparse cannot declare them, so they are split off first.
_OVERRIDE = re.compile(r"^--[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)+=")
TOP_LEVEL_KEYS = ("method",)
"""Config keys outside any section (`--method=ia3`): overrides wherever the command has no option of
that name (`qlorakit estimate --method` is its own option). A test keeps this equal to the config's."""
_TOP_LEVEL = re.compile(rf"^--({'|'.join(TOP_LEVEL_KEYS)})=")


def is_override(arg: str) -> bool:
    """True for a config override such as `--train.lr=1e-4`."""
    return bool(_OVERRIDE.match(arg))


def _split_overrides(
    parser: argparse.ArgumentParser, argv: list[str]
) -> tuple[argparse.Namespace, list[str]]:
    """Parse `argv`; returns (the parsed options, the config overrides in command-line order)."""
    args, extra = parser.parse_known_args([a for a in argv if not is_override(a)])
    top = {a for a in extra if _TOP_LEVEL.match(a)}  # only what the command's own options left over
    unknown = [a for a in extra if a not in top]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, [a for a in argv if is_override(a) or a in top]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; with `only`, import just that subcommand's module."""
    parser = argparse.ArgumentParser(prog="qlorakit", description="QLoRA fine-tuning on small hardware.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a subcommand that is not part of this build
        module.register(sub)
    return parser


def _interrupted(exc: BaseException | None) -> bool:
    """True when a Ctrl-C is anywhere in the exception's chain: a library that fails while the
    KeyboardInterrupt unwinds through it (a closed file, a half-built object) must not hide it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _run(argv: list[str]) -> int:
    first = argv[0] if argv and not argv[0].startswith("-") else None
    if first is None and not argv:
        argv = ["train"]  # `qlorakit` alone runs the embedded default demo, like `qlorakit train`
        first = "train"
    parser = build_parser(only=first if first in COMMANDS else None)
    args, overrides = _split_overrides(parser, argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    # Commands that take config overrides declare `overrides=[]` in their defaults; others reject them.
    if overrides and getattr(args, "overrides", None) is None:
        parser.error(f"qlorakit {args.command} takes no --section.key=value overrides: {' '.join(overrides)}")
    if overrides:
        args.overrides = overrides
    if args.command not in _NO_TENSORS:
        configure_allocator()  # freed tensors leave the resident set, without a fault per tensor (qlorakit.core.memory)
    try:
        return int(args.func(args) or 0)
    except QLoraKitError as exc:
        print(f"qlorakit {args.command}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    name = "train"
    try:  # everything inside: a Ctrl-C at any point is the clean exit 130, never a traceback
        argv = list(sys.argv[1:] if argv is None else argv)
        name = next((a for a in argv if not a.startswith("-")), name)
        return _run(argv)
    except KeyboardInterrupt:
        print(f"qlorakit {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _interrupted(exc):
            raise
        print(f"qlorakit {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
