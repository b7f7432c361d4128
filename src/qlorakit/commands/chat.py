"""`qlorakit chat`: an interactive, streaming, multi-turn chat with a model and its adapters.

Lines starting with `/` are commands: `/adapter NAME`, `/base`, `/reset`, `/help`, `/quit`.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from qlorakit.commands.generate import add_model_arguments, add_sampling_arguments, open_server
from qlorakit.data import Message
from qlorakit.eval.generation import GenerationSettings

HELP = (
    "commands: /adapter NAME (switch adapter), /base (no adapter), /adapters (list), /reset (forget the "
    "conversation), /quit"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a model and adapters in the terminal",
        description="Interactive chat reading standard input; replies stream as they are generated. " + HELP,
    )
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="a system message that starts every conversation")
    add_sampling_arguments(parser, max_new_tokens=256)
    parser.set_defaults(func=run)


class ChatSession:
    """Conversation state and command handling; replies stream to `out` as they are generated."""

    def __init__(self, server, settings, *, adapter: str | None, system: str | None, out: TextIO) -> None:
        self.server, self.settings, self.adapter, self.system, self.out = (
            server,
            settings,
            adapter,
            system,
            out,
        )
        self.history: list = []

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def command(self, line: str) -> bool:
        """Handle a `/command`; False means quit."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "reset":
            self.history.clear()
            self._say("[conversation reset]")
        elif name == "base":
            self.adapter = None
            self._say("[using the base model, adapters off]")
        elif name == "adapter":
            if arg not in self.server.adapter_names:
                known = ", ".join(self.server.adapter_names) or "none loaded"
                self._say(f"[no adapter named {arg!r}; loaded: {known}]")
            else:
                self.adapter = arg
                self._say(f"[using adapter {arg}]")
        elif name == "adapters":
            self._say(
                f"[loaded: {', '.join(self.server.adapter_names) or 'none'}; active: {self.adapter or 'base'}]"
            )
        else:
            self._say(f"[{HELP}]")
        return True

    def reply(self, text: str) -> str:
        self.history.append(Message("user", text))
        messages = ([Message("system", self.system)] if self.system else []) + self.history

        def emit(piece: str) -> None:
            self.out.write(piece)
            self.out.flush()

        answer = self.server.generate(messages, self.adapter, self.settings, on_text=emit)
        self.out.write("\n")
        self.out.flush()
        self.history.append(Message("assistant", answer.strip()))
        return answer


def run(args: argparse.Namespace) -> int:
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    server = open_server(args)
    adapter = args.adapter_name or (server.adapter_names[0] if server.adapter_names else None)
    session = ChatSession(server, settings, adapter=adapter, system=args.system, out=sys.stdout)
    interactive = sys.stdin.isatty()
    print(f"[chat with {args.model}; adapter: {adapter or 'base'}; {HELP}]", file=sys.stderr, flush=True)
    while True:
        if interactive:
            print(f"{adapter_label(session)}> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line):
                break
            continue
        session.reply(line)
    return 0


def adapter_label(session: ChatSession) -> str:
    return session.adapter or "base"
