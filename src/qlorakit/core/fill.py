"""Fill frozen dataclasses from plain data (YAML, `--section.key=value` overrides), collecting every error.

Generic over any dataclass tree whose fields are annotated with bool, int, float, str, Literal, unions with
None, lists, string-keyed dicts and nested dataclasses; `qlorakit.config` is its one user. Errors are
appended to a list (not raised) so that a config reports all of its problems at once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from qlorakit.core.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Check `value` against annotation `tp`; return the converted value (errors appended, not raised)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            trial: list[str] = []
            result = coerce(value, option, key, trial)
            if not trial:
                return result
        errors.append(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in args:
            errors.append(f"{key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {value!r}")
            return []
        return [coerce(v, args[0], f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return {}
        return {str(k): coerce(v, args[1], f"{key}.{k}", errors) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, errors)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string; users mean a number
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{key}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config annotation {tp!r} at {key} is not supported")  # internal invariant


def build(cls: type, data: Any, prefix: str, errors: list[str]) -> Any:
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{where}: expected a mapping of keys, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            errors.append(f"{prefix + '.' if prefix else ''}{key}: unknown key (known: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], f"{prefix + '.' if prefix else ''}{name}", errors)
    try:
        return cls(**kwargs)
    except TypeError:  # only reachable after a reported type error left a bad value
        return cls()


def parse_override(text: str) -> tuple[list[str], Any]:
    """`--train.lr=1e-4` or `train.lr=1e-4` -> (["train", "lr"], 0.0001); values are parsed as YAML."""
    import yaml

    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r}: expected --section.key=value (e.g. --train.lr=1e-4)")
    key, raw = body.split("=", 1)
    path = [p.replace("-", "_") for p in key.split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return path, value


__all__ = ["build", "coerce", "parse_override"]
