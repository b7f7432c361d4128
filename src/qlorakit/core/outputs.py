"""The one output rule: a writer only ever replaces what it created itself.

Every command that writes (train, quantize, merge, export hf/gguf/bnb4, eval --out, compare) checks its
target with `check_output` before its long work starts, then writes through `output_folder` or
`output_file` (whole-target writers) or `claim_folder` (train and compare, which fill a folder in place).
For a target T of a command that reads the inputs I:

1. T is never one of I, a folder above one of them, nor an existing file or folder inside one of them,
   even with overwrite: writing there would replace what the command reads. (A new path inside an
   input folder is fine: a GGUF beside the weights it came from.)
2. A file is never replaced by a folder, nor a folder by a file.
3. An existing T is replaced (or written into) only when this command made it: an empty folder; a folder
   whose marker `.qlorakit-output.json` names this command and lists every entry in it (a folder filled
   in place may also hold other files: only this command's own names are ever written there); a file that
   carries this command's signature (the GGUF key `qlorakit.output`, the top-level JSON key
   `qlorakit_output`). Anything else needs overwrite (`--overwrite`, or `output.overwrite` for train).
4. The nearest existing folder on T's path must be a folder (not a file) in which a file can be created,
   with room for `need_bytes` when the caller can estimate them.

A refusal is an `OutputError` (exit status 2) raised before anything is written. Temporaries that a
killed run left beside T (named by `qlorakit.core.atomic`, their process gone) are removed by the check. Running
out of space while writing becomes an `OutputError` that says how much space the output needed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from qlorakit.core.atomic import (
    atomic_directory,
    atomic_open,
    atomic_write_json,
    hold_interrupts,
    is_temporary,
    release_interrupts,
    remove_paths,
    stale_temporaries,
    temp_prefix,
)
from qlorakit.core.errors import QLoraKitError

MARKER = ".qlorakit-output.json"
"""The file that marks a folder as written by qlorakit: `{"written_by", "command", "files"}`."""
GGUF_SIGNATURE = "qlorakit.output"
"""GGUF metadata key naming the command that wrote the file (llama.cpp ignores unknown keys)."""
JSON_SIGNATURE = "qlorakit_output"
"""Top-level key of a JSON report naming the command that wrote it."""
_JSON_SCAN_LIMIT = 64 * 2**20  # a bigger JSON file is not one of our reports: never parse it whole

Kind = Literal["folder", "file"]
Mode = Literal["replace", "update"]


class OutputError(QLoraKitError):
    """An output path is refused (it is an input, not ours, not writable, too small) or the disk filled up."""


@dataclass(frozen=True)
class OutputPlan:
    """A target that passed `check_output`: how the writer may use it."""

    path: Path
    command: str
    """The writer's name as the marker records it (`merge`, `export hf`, `train`, ...)."""
    kind: Kind = "folder"
    mode: Mode = "replace"
    """`replace`: the target is written whole; `update`: files are written into the folder in place."""
    overwrite: bool = False
    need_bytes: int | None = None
    label: str = "--out"
    """How the user named the path (`--out`, `output.dir`), for messages."""
    switch: str = "--overwrite"
    """What the user passes to allow overwriting (`--overwrite`, `output.overwrite=true`)."""
    suffix: str = ""
    """The usual suffix of a file output (`.gguf`), for the example path in messages."""


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def check_output(
    path: str | os.PathLike[str],
    *,
    command: str,
    kind: Kind = "folder",
    mode: Mode = "replace",
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    overwrite: bool = False,
    need_bytes: int | None = None,
    label: str = "--out",
    switch: str = "--overwrite",
    suffix: str = "",
) -> OutputPlan:
    """Apply the rule (module doc) to `path` before any work; OutputError naming the path and the fix."""
    plan = OutputPlan(
        Path(path).expanduser(), command, kind, mode, overwrite, need_bytes, label, switch, suffix
    )
    _refuse_inputs(plan, inputs)
    _refuse_file_on_path(plan)
    remove_paths(stale_temporaries(plan.path.parent, plan.path.name))
    _refuse_existing(plan)
    where = _writable_folder(plan)
    _check_space(plan, where)
    return plan


def _refuse_inputs(plan: OutputPlan, inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    target = plan.path.resolve()
    replaces = plan.mode == "replace" and (plan.path.exists() or plan.path.is_symlink())
    for item in inputs:
        if item is None or not os.fspath(item) or not Path(item).expanduser().exists():
            continue  # a built-in name or `builtin`: nothing on disk to protect
        source = Path(item).expanduser().resolve()
        if target == source:
            how = "is"
        elif target in source.parents:
            how = "contains"
        elif replaces and source.is_dir() and source in target.parents:
            how = "is part of"  # a new file beside the input's own is fine, replacing one of them is not
        else:
            continue
        raise OutputError(
            f"{plan.label} {plan.path} {how} the input {item}: writing there would overwrite the input, "
            f"so it is refused even with {plan.switch}; choose another path"
        )


def _refuse_file_on_path(plan: OutputPlan) -> None:
    for folder in plan.path.parents:
        if folder.is_dir():
            return
        if folder.exists() or folder.is_symlink():
            raise OutputError(
                f"{plan.label} {plan.path}: {folder} is a file, not a folder, so nothing can be written "
                "below it; choose another path"
            )


def _refuse_existing(plan: OutputPlan) -> None:
    path = plan.path
    if not (path.exists() or path.is_symlink()):
        return
    if plan.kind == "folder" and not path.is_dir():
        raise OutputError(
            f"{plan.label} {path} is a file and {plan.command} writes a folder; give a folder path "
            "(a file is never replaced by a folder, even with the overwrite switch)"
        )
    if plan.kind == "file" and path.is_dir():
        raise OutputError(
            f"{plan.label} {path} is a folder and {plan.command} writes a file; give a file path such as "
            f"{path / ('output' + plan.suffix)} (a folder is never replaced by a file)"
        )
    if plan.mode == "update":
        remove_paths(stale_temporaries(path))
    if plan.overwrite:
        return
    if plan.kind == "file":
        if own_file_command(path) != plan.command:
            raise OutputError(
                f"{plan.label} {path} exists and was not written by qlorakit {plan.command}; choose another "
                f"path, or pass {plan.switch} to replace it"
            )
        return
    foreign = foreign_entries(path, plan.command, plan.mode)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        action = "replace it" if plan.mode == "replace" else "write into it"
        raise OutputError(
            f"{plan.label} {path} holds files that qlorakit {plan.command} did not write ({shown}); choose "
            f"another (new or empty) folder, or pass {plan.switch} to {action}"
        )


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a folder qlorakit wrote, or None (missing, unreadable, not ours)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("written_by") != "qlorakit":
        return None
    files = marker.get("files")
    if not isinstance(marker.get("command"), str) or not isinstance(files, list):
        return None
    return marker


def foreign_entries(folder: Path, command: str, mode: Mode = "replace") -> list[str]:
    """Entries of `folder` that `command` did not write (temporaries and the marker aside)."""
    entries = sorted(e.name for e in folder.iterdir() if e.name != MARKER and not is_temporary(e.name))
    marker = read_marker(folder)
    if marker is None or marker["command"] != command:
        return entries
    if mode == "update":
        return []  # ours: the command writes only its own names into it
    return [e for e in entries if e not in marker["files"]]


def own_file_command(path: Path) -> str | None:
    """The command whose signature `path` carries (GGUF metadata or JSON report key), else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head == b"GGUF":
            from gguf import GGUFReader

            field = GGUFReader(str(path)).fields.get(GGUF_SIGNATURE)
            return None if field is None else str(field.contents())
        if head[:1] == b"{" and path.stat().st_size <= _JSON_SCAN_LIMIT:
            data = json.loads(path.read_text(encoding="utf-8"))
            mark = data.get(JSON_SIGNATURE) if isinstance(data, dict) else None
            return mark.get("command") if isinstance(mark, dict) else None
    except Exception:  # a file we cannot parse is not one of ours
        return None
    return None


def json_signature(command: str) -> dict[str, dict[str, str]]:
    """The entry a JSON report carries so that a later run recognises it as its own."""
    return {JSON_SIGNATURE: {"written_by": "qlorakit", "command": command}}


def _writable_folder(plan: OutputPlan) -> Path:
    """Create (and delete) a temporary file where the writer will write; the folder it probed."""
    if plan.mode == "update" and plan.path.is_dir():
        where = plan.path
    else:
        where = next(p for p in plan.path.parents if p.is_dir())
    held = hold_interrupts()  # Ctrl-C between creating and unlinking the probe would leave it behind
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(plan.path.name), suffix=".tmp", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"{plan.label} {plan.path}: cannot write in {where} ({exc.strerror or exc}); choose a writable "
            "location"
        ) from exc
    finally:
        release_interrupts(held)
    return where


def _check_space(plan: OutputPlan, where: Path) -> None:
    if plan.need_bytes is None:
        return
    free = shutil.disk_usage(where).free
    if free < plan.need_bytes:
        raise OutputError(
            f"{plan.label} {plan.path}: the output needs about {_size(plan.need_bytes)} but only "
            f"{_size(free)} is free on the file system of {where}; free some space or choose another location"
        )


# ---------------------------------------------------------------------------------------------------------
# Writing


def _is_disk_full(exc: BaseException, where: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return True
    # numpy's short writes ("N requested and M written") carry no errno: look at the disk itself
    try:
        return isinstance(exc, OSError) and shutil.disk_usage(where).free < 2**20
    except OSError:
        return False


@contextlib.contextmanager
def disk_errors(plan: OutputPlan) -> Iterator[None]:
    """Turn a full disk (or a file system that turned read-only) while writing into an OutputError."""
    where = next((p for p in (plan.path, *plan.path.parents) if p.is_dir()), plan.path.parent)
    try:
        yield
    except QLoraKitError:
        raise
    except Exception as exc:
        if _is_disk_full(exc, where):
            need = f"about {_size(plan.need_bytes)}" if plan.need_bytes else "more than was free"
            raise OutputError(
                f"{plan.label} {plan.path}: the disk filled up while writing (the output needs {need}; "
                f"{_size(shutil.disk_usage(where).free)} is free now); nothing was written under that name; "
                "free some space or choose another location"
            ) from exc
        if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise OutputError(
                f"{plan.label} {plan.path}: cannot write ({exc.strerror}: {exc.filename}); choose a "
                "writable location"
            ) from exc
        raise


def _recheck(plan: OutputPlan) -> None:
    """The target must still be what `check_output` allowed (the user may have changed it meanwhile)."""
    _refuse_existing(plan)


def write_marker(folder: Path, command: str, files: Iterable[str]) -> None:
    """Mark `folder` as written by `command`, listing its entries."""
    names = sorted({n for n in files if n != MARKER and not is_temporary(n)})
    atomic_write_json(folder / MARKER, {"written_by": "qlorakit", "command": command, "files": names})


@contextlib.contextmanager
def output_folder(plan: OutputPlan) -> Iterator[Path]:
    """A temporary folder that replaces `plan.path` whole, marked as ours, when the block succeeds."""
    with disk_errors(plan), atomic_directory(plan.path) as tmp:
        yield tmp
        write_marker(tmp, plan.command, (e.name for e in tmp.iterdir()))
        _recheck(plan)


@contextlib.contextmanager
def output_file(plan: OutputPlan) -> Iterator[BinaryIO]:
    """A binary handle whose file replaces `plan.path` when the block succeeds."""
    with disk_errors(plan), atomic_open(plan.path) as fh:
        yield fh
        _recheck(plan)


def add_own_names(folder: Path, command: str, names: Iterable[str]) -> None:
    """List more entries in the marker of a folder `command` fills in place (no-op without its marker)."""
    marker = read_marker(folder)
    if marker is not None and marker["command"] == command and set(names) - set(marker["files"]):
        write_marker(folder, command, [*marker["files"], *names])


def claim_folder(plan: OutputPlan, names: Iterable[str]) -> None:
    """Create the in-place folder of `plan` and mark it as the command's, listing `names` as its own."""
    with disk_errors(plan):
        plan.path.mkdir(parents=True, exist_ok=True)
        marker = read_marker(plan.path)
        if marker is None or marker["command"] != plan.command:
            write_marker(plan.path, plan.command, names)
        else:
            add_own_names(plan.path, plan.command, names)
