"""`qlorakit generate`: complete one prompt with a base model and zero, one or several adapters."""

from __future__ import annotations

import argparse
import sys

from qlorakit.commands.options import add_16bit_option
from qlorakit.core.errors import ConfigError
from qlorakit.eval.generation import GenerationSettings
from qlorakit.eval.serving import AdapterServer
from qlorakit.models.load import parse_adapter_specs


def add_model_arguments(parser: argparse.ArgumentParser, *, several: bool = True) -> None:
    """Arguments shared by generate and chat: the model, adapters, 16-bit switch and template."""
    parser.add_argument(
        "model", help="a Hugging Face folder, a .gguf file, or a built-in name (smollm2-135m)"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a PEFT adapter folder; repeat to load several on one base (named after the folder, or NAME=DIR)",
    )
    parser.add_argument("--adapter-name", default=None, help="which loaded adapter to use")
    add_16bit_option(parser)
    parser.add_argument(
        "--template",
        choices=("auto", "chat", "alpaca"),
        default="auto",
        help="prompt format: the tokenizer's chat template when it has one (auto), or the Alpaca template",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily (default)")
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="complete a prompt with a model and adapters",
        description="Complete a prompt, rendered as in training, with greedy decoding unless --temperature > 0. "
        "With several adapters and no --adapter-name, each adapter answers in turn.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--prompt", required=True, help="the instruction to complete ('-' reads standard input)"
    )
    parser.add_argument("--base-too", action="store_true", help="also answer with the plain base model")
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)


def open_server(args: argparse.Namespace):
    """An AdapterServer for the command's model and adapters, and the adapter to start with."""
    adapters = parse_adapter_specs(args.adapter)
    if args.adapter_name is not None and args.adapter_name not in adapters:
        known = ", ".join(adapters) or "none given"
        raise ConfigError(f"--adapter-name {args.adapter_name!r} is not one of the --adapter names ({known})")
    server = AdapterServer(args.model, adapters, four_bit=not args.sixteen_bit, template=args.template)
    return server


def run(args: argparse.Namespace) -> int:
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    server = open_server(args)
    if args.adapter_name is not None:
        names: list[str | None] = [args.adapter_name]
    else:
        names = list(server.adapter_names) or [None]
    if args.base_too and None not in names:
        names.insert(0, None)

    def emit(piece: str) -> None:  # tokens appear as they are generated
        sys.stdout.write(piece)
        sys.stdout.flush()

    for name in names:
        if len(names) > 1:
            print(f"=== {name or 'base'} ===", flush=True)
        server.generate(prompt, name, settings, on_text=emit)
        print(flush=True)
    return 0
