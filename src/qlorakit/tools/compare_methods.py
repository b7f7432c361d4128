"""The names `qlorakit compare --methods` accepts, each one a set of config overrides for `qlorakit train`.

Compare knows a method only through this table: a run is `qlorakit train CONFIG` with the row's settings
(and the user's overrides before them), so every method behind `qlorakit.methods.METHODS` that the
config's `method` key accepts can be compared without a line changed here. A name whose method this
qlorakit does not have (not in `METHODS`, or not a value of `method`) is refused by `parse_methods`
before anything trains, with the names that are available.

`dora` runs on the 4-bit base (QDoRA, the way QLoRA users run DoRA); `ia3`, `prompt`, `prefix` and
`adapter` keep the config's own `quant.enabled`.
"""

from __future__ import annotations

import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from qlorakit.config import Config
from qlorakit.core.errors import ConfigError
from qlorakit.methods import METHODS


@dataclass(frozen=True)
class CompareMethod:
    """One compare name: the run's folder under `--out`, its label in the report, its config settings."""

    name: str
    label: str
    folder: str
    settings: tuple[tuple[str, bool | str], ...]
    """(dotted config key, value) pairs, applied after the user's overrides."""

    @property
    def method(self) -> str:
        """The config's `method` value this run trains with."""
        return str(dict(self.settings)["method"])

    @property
    def keys(self) -> tuple[str, ...]:
        """The config keys this run sets (they may differ between the runs of one comparison)."""
        return tuple(key for key, _ in self.settings)

    def overrides(self) -> list[str]:
        """The settings as `--section.key=value` arguments (values in YAML spelling, as overrides are read)."""

        def spell(value: bool | str) -> str:
            return ("true" if value else "false") if isinstance(value, bool) else value

        return [f"--{key}={spell(value)}" for key, value in self.settings]


_16BIT, _4BIT = ("quant.enabled", False), ("quant.enabled", True)
COMPARE_METHODS: dict[str, CompareMethod] = {
    row.name: row
    for row in (
        CompareMethod("full", "Full fine-tuning", "full", (("method", "full"), _16BIT)),
        # "lora16": the folder name two-run comparisons have always used
        CompareMethod("lora", "16-bit LoRA", "lora16", (("method", "lora"), _16BIT)),
        CompareMethod("qlora", "QLoRA", "qlora", (("method", "lora"), _4BIT)),
        CompareMethod(
            "dora", "DoRA (4-bit base)", "dora", (("method", "lora"), _4BIT, ("lora.use_dora", True))
        ),
        CompareMethod("ia3", "IA3", "ia3", (("method", "ia3"),)),
        CompareMethod("prompt", "Prompt tuning", "prompt", (("method", "prompt"),)),
        CompareMethod("prefix", "Prefix tuning", "prefix", (("method", "prefix"),)),
        CompareMethod("adapter", "Adapters", "adapter", (("method", "adapter"),)),
    )
}
DEFAULT_METHODS = ("lora", "qlora")


def config_methods() -> tuple[str, ...]:
    """The values the config's `method` key accepts (its Literal)."""
    return typing.get_args(typing.get_type_hints(Config)["method"])


def known_methods() -> set[str]:
    """The config `method` values this qlorakit can train: in `METHODS` and accepted by the config."""
    return set(METHODS) & set(config_methods())


def available_names(known: Collection[str] | None = None) -> list[str]:
    """The compare names whose method is `known` (default: `known_methods()`), in table order."""
    known = known_methods() if known is None else known
    return [name for name, row in COMPARE_METHODS.items() if row.method in known]


def _name_problems(names: Sequence[str], text: str, available: list[str]) -> list[str]:
    """Every problem of a parsed `--methods` list, each naming the value and the fix."""
    problems, seen = [], set()
    for name in names:
        if not name:
            problems.append(f"an empty name in {text!r}; separate names with single commas")
        elif name not in COMPARE_METHODS:
            problems.append(f"unknown name {name!r}; compare names are {', '.join(COMPARE_METHODS)}")
        elif name in seen:
            problems.append(f"{name!r} is listed twice; each method runs once")
        elif name not in available:
            problems.append(
                f"{name!r} needs the fine-tuning method {COMPARE_METHODS[name].method!r}, which this "
                f"qlorakit does not have; available: {', '.join(available)}"
            )
        seen.add(name)
    return problems


def parse_methods(text: str | None, known: Collection[str] | None = None) -> tuple[CompareMethod, ...]:
    """The runs of `--methods a,b,c` in the order given (None: the default, 16-bit LoRA and QLoRA).

    Names are case-insensitive; an empty list, an empty, unknown, repeated or unavailable name (its
    method not among `known`, default `known_methods()`) is a ConfigError naming `--methods` (every
    problem at once), raised before any config or model is read.
    """
    available = available_names(known)
    if text is None:
        return tuple(COMPARE_METHODS[name] for name in DEFAULT_METHODS)
    if not text.strip():
        raise ConfigError(
            f"--methods: the list is empty; name at least one of {', '.join(available)} "
            "(comma-separated, e.g. --methods lora,qlora,dora)"
        )
    names = [part.strip().lower() for part in text.split(",")]
    problems = _name_problems(names, text, available)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"--methods: {len(problems)} problem(s):\n{lines}")
    return tuple(COMPARE_METHODS[name] for name in names)


__all__ = [
    "COMPARE_METHODS",
    "DEFAULT_METHODS",
    "CompareMethod",
    "available_names",
    "config_methods",
    "known_methods",
    "parse_methods",
]
