"""Dataset files -> validated records.

Supported inputs (`DatasetSpec.format`, `auto` detects it from the extension and the first valid row):
- `alpaca`: rows `{"instruction", "input" (optional), "output", "system" (optional)}`;
- `chat`: rows `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`;
- `sharegpt`: rows `{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}`;
- `text`: a `.txt` file (one document per blank-line-separated paragraph) or rows `{"text": str}`.
Rows come from a JSON list, a JSONL file, or a Hugging Face `datasets` folder written by `save_to_disk`.
Unknown keys in a row are ignored. Every bad row raises a `DataError` naming `file:line` (JSONL and text),
`file[index]` (JSON list, `datasets` folder) and the fix, or is skipped and counted with `skip_invalid`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from qlorakit.config import DatasetSpec
from qlorakit.core.errors import DataError

BUILTIN = "builtin"
FORMATS = ("alpaca", "chat", "sharegpt", "text")
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
_CHAT_ROLES = ("system", "user", "assistant")
_SKIP_HINT = "or set data.skip_invalid: true to skip bad rows"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Record:
    """One training row: `messages` (optional system, then alternating user/assistant ending with assistant)
    or `text` (continued pre-training). `source` is `file:line` or `file[index]` for error messages.
    `instruction_input` keeps an Alpaca row's (instruction, input) so the Alpaca template can render its
    `### Input:` section; the user message holds both, joined by a blank line."""

    messages: tuple[Message, ...] | None
    text: str | None
    source: str
    instruction_input: tuple[str, str] | None = None


def reference_answer(record: Record) -> str | None:
    """The last assistant message of a conversation record, or None (text rows have no reference)."""
    if record.messages and record.messages[-1].role == "assistant":
        return record.messages[-1].content
    return None


@dataclass(frozen=True)
class LoadResult:
    records: list[Record]
    skipped: int
    path: str
    format: str = "auto"
    """The format the rows were read as (after auto-detection)."""
    skipped_rows: tuple[str, ...] = ()
    """`file:line (problem)` of the first skipped rows (at most `SKIPPED_SHOWN`)."""


SKIPPED_SHOWN = 5


class _RowError(Exception):
    """A bad row: (problem, fix); turned into a DataError with its location by the loader."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


# ---------------------------------------------------------------------------------------------------------
# Row parsers: plain dict -> Record, raising _RowError.


def _string(row: dict[str, Any], key: str, *, required: bool, allow_empty: bool, fix: str) -> str:
    if key not in row or row[key] is None:
        if required:
            raise _RowError(f"missing field {key!r}", fix)
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise _RowError(f"field {key!r} must be a string, got {type(value).__name__}", fix)
    if not allow_empty and not value.strip():
        raise _RowError(f"field {key!r} is empty", fix)
    return value


def parse_alpaca(row: dict[str, Any], source: str) -> Record:
    fix = 'give each row a non-empty "instruction" and "output" string ("input" is optional)'
    instruction = _string(row, "instruction", required=True, allow_empty=False, fix=fix)
    inp = _string(row, "input", required=False, allow_empty=True, fix=fix)
    output = _string(row, "output", required=True, allow_empty=False, fix=fix)
    system = _string(row, "system", required=False, allow_empty=True, fix=fix)
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    messages = [Message("user", user), Message("assistant", output)]
    if system.strip():
        messages.insert(0, Message("system", system))
    return Record(tuple(messages), None, source, (instruction, inp if inp.strip() else ""))


def check_conversation(messages: list[Message]) -> None:
    """Optional system first, then user/assistant alternating, ending with a non-empty assistant turn."""
    fix = "use an optional system turn, then alternate user and assistant turns, ending with assistant"
    body = messages[1:] if messages and messages[0].role == "system" else messages
    if not body:
        raise _RowError("the conversation has no user/assistant turns", fix)
    for i, msg in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg.role != expected:
            where = "a system turn after the first turn" if msg.role == "system" else f"{msg.role!r}"
            raise _RowError(f"turn {i + len(messages) - len(body)}: expected {expected!r}, got {where}", fix)
        if msg.role == "assistant" and not msg.content.strip():
            raise _RowError(f"turn {i + len(messages) - len(body)}: the assistant content is empty", fix)
    if body[-1].role != "assistant":
        raise _RowError("the conversation does not end with an assistant turn", fix + " (drop the last turn)")


def _parse_turns(
    row: dict[str, Any], key: str, role_key: str, text_key: str, roles: dict[str, str]
) -> list[Message]:
    fix = f'give "{key}" as a list of {{"{role_key}": ..., "{text_key}": ...}} objects'
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise _RowError(f"field {key!r} must be a non-empty list", fix)
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _RowError(f"{key}[{i}] must be an object, got {type(turn).__name__}", fix)
        role, content = turn.get(role_key), turn.get(text_key)
        if not isinstance(role, str) or not isinstance(content, str):
            raise _RowError(f'{key}[{i}] needs string "{role_key}" and "{text_key}" fields', fix)
        if role not in roles:
            raise _RowError(f"{key}[{i}]: unknown role {role!r}", f"use one of {', '.join(sorted(roles))}")
        messages.append(Message(roles[role], content))
    return messages


def parse_chat(row: dict[str, Any], source: str) -> Record:
    messages = _parse_turns(row, "messages", "role", "content", {r: r for r in _CHAT_ROLES})
    check_conversation(messages)
    return Record(tuple(messages), None, source)


def parse_sharegpt(row: dict[str, Any], source: str) -> Record:
    messages = _parse_turns(row, "conversations", "from", "value", _SHAREGPT_ROLES)
    check_conversation(messages)
    return Record(tuple(messages), None, source)


def parse_text(row: dict[str, Any], source: str) -> Record:
    text = _string(
        row, "text", required=True, allow_empty=False, fix='give each row a non-empty "text" string'
    )
    return Record(None, text, source)


_PARSERS = {"alpaca": parse_alpaca, "chat": parse_chat, "sharegpt": parse_sharegpt, "text": parse_text}


def detect_row_format(row: Any) -> str | None:
    """The format a row looks like from its keys, or None."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return None


# ---------------------------------------------------------------------------------------------------------
# Raw rows from files: (source, row or _RowError) pairs.

RawRow = tuple[str, Any]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); save the file as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


def _jsonl_rows(path: Path, text: str) -> Iterator[RawRow]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{path}:{number}", _RowError(f"invalid JSON ({exc.msg})", "write one JSON object per line")


def _json_or_jsonl_rows(path: Path) -> Iterator[RawRow]:
    text = _read_text(path)
    if not text.lstrip().startswith("["):  # a .json file holding JSON Lines is common; read it as such
        yield from _jsonl_rows(path, text)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); fix the file or write it as JSON Lines "
            "(one object per line) so bad rows can be reported and skipped one by one"
        ) from exc
    for index, row in enumerate(data):
        yield f"{path}[{index}]", row


def _paragraph_rows(path: Path) -> Iterator[RawRow]:
    text = _read_text(path)
    for match in re.finditer(r"\S(?:.*?)(?=\n[ \t]*\n|\Z)", text, flags=re.DOTALL):
        line = text.count("\n", 0, match.start()) + 1
        yield f"{path}:{line}", {"text": match.group(0).rstrip()}


def _is_datasets_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _datasets_rows(path: Path) -> Iterator[RawRow]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"{path}: this is a Hugging Face `datasets` folder (saved with save_to_disk) but the `datasets` "
            "package is not installed; run `pip install datasets`, or export the rows to JSONL"
        ) from exc
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.keys())
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
        else:
            raise DataError(
                f"{path}: a DatasetDict with splits {splits} and no 'train' split; save one split"
            )
    for index, row in enumerate(loaded):
        yield f"{path}[{index}]", row


def builtin_path() -> Path:
    """The embedded instruction dataset (`qlorakit/resources/instructions.jsonl`)."""
    return Path(str(resources.files("qlorakit").joinpath("resources", "instructions.jsonl")))


def _raw_rows(path: Path, fmt: str) -> tuple[Iterator[RawRow], str | None]:
    """Rows of a file or folder and the format implied by its kind (None: detect from rows)."""
    if path.is_dir():
        if not _is_datasets_folder(path):
            raise DataError(
                f"{path}: a folder that is not a `datasets` save_to_disk folder (no dataset_info.json or "
                "state.json); point data.datasets[].path at a JSON/JSONL/text file"
            )
        return _datasets_rows(path), None
    if not path.is_file():
        raise DataError(
            f"{path}: dataset file not found; set data.datasets[].path to an existing JSON, JSONL or .txt "
            f"file, a `datasets` folder, or {BUILTIN!r}"
        )
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".md"):
        if fmt not in ("auto", "text"):
            raise DataError(f"{path}: a plain-text file can only be read as format 'text', not {fmt!r}")
        return _paragraph_rows(path), "text"
    if suffix in (".json", ".jsonl", ".ndjson"):
        return _json_or_jsonl_rows(path), None
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl or .txt")


def _fail(source: str, problem: str, fix: str) -> DataError:
    return DataError(f"{source}: {problem}; {fix} ({_SKIP_HINT})")


def load_records(spec: DatasetSpec, *, skip_invalid: bool = False) -> LoadResult:
    """Read and validate every row of `spec.path` (`builtin` = the embedded dataset).

    Raises DataError on a missing file or a bad row (unless `skip_invalid`, which skips and counts it).
    An empty result is returned as is: callers decide (see `qlorakit.data.build.check_datasets`)."""
    if spec.format not in ("auto", *FORMATS):
        raise DataError(f"{spec.path}: unknown format {spec.format!r}; use auto, {', '.join(FORMATS)}")
    path = builtin_path() if spec.path == BUILTIN else Path(spec.path).expanduser()
    rows, implied = _raw_rows(path, spec.format)
    fmt = implied or spec.format
    records: list[Record] = []
    skipped: list[str] = []
    for source, row in rows:
        try:
            if isinstance(row, _RowError):
                raise row
            if not isinstance(row, dict):
                raise _RowError(
                    f"expected a JSON object, got {type(row).__name__}", "write one object per row"
                )
            if fmt == "auto":
                detected = detect_row_format(row)
                if detected is None:
                    raise _RowError(
                        f"cannot tell the format from keys {sorted(row)}",
                        'use "instruction"/"output" (alpaca), "messages" (chat), "conversations" (sharegpt) '
                        'or "text", or set data.datasets[].format',
                    )
                fmt = detected
            records.append(_PARSERS[fmt](row, source))
        except _RowError as err:
            if not skip_invalid:
                raise _fail(source, err.problem, err.fix) from None
            skipped.append(f"{source} ({err.problem})")
    return LoadResult(records, len(skipped), str(path), fmt, tuple(skipped[:SKIPPED_SHOWN]))
