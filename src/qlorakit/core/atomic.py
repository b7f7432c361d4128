"""Atomic writes: a reader never sees a half-written file or folder.

Files are written to a temporary sibling, flushed and fsynced, then renamed over the target
(rename is atomic on POSIX within one filesystem). Folders are built in a temporary sibling and
renamed into place as a whole.

Every temporary is named `.<target>.qlorakit-<pid>-<random>.tmp`: hidden, tied to its target, and
carrying the writer's process id, so a later run can tell a temporary left by a killed writer (its
process is gone) from one still being written, and never mistakes a user's file for one
(`stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_TEMP = re.compile(r"^\.(?P<name>.+)\.qlorakit-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")


def temp_prefix(name: str) -> str:
    """The start of every temporary name of target `name` written by this process."""
    return f".{name}.qlorakit-{os.getpid()}-"


def make_temp_dir(parent: Path, name: str) -> Path:
    """A new empty folder `parent/.<name>.qlorakit-<pid>-<random>.tmp` with the usual permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(name), suffix=".tmp", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the finished folder gets the usual permissions
    return tmp


def is_temporary(name: str) -> bool:
    """True for a name qlorakit gives its temporaries (see the module doc)."""
    return _TEMP.match(name) is not None


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # (Windows' os.kill terminates: never probe, never clean)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_temporaries(parent: Path, name: str | None = None) -> list[Path]:
    """Temporaries in `parent` whose writer is gone: those of target `name` (and of `name.*`, e.g. a
    merge's dense folder beside its output), or all of them when `name` is None."""
    if not parent.is_dir():
        return []
    found = []
    for entry in parent.iterdir():
        match = _TEMP.match(entry.name)
        if match is None:
            continue
        if name is not None and not (match["name"] == name or match["name"].startswith(f"{name}.")):
            continue
        if not _alive(int(match["pid"])):
            found.append(entry)
    return sorted(found)


def remove_paths(paths: list[Path]) -> None:
    """Delete files and folders (each may already be gone)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def hold_interrupts() -> Any:
    """Block SIGINT/SIGTERM for this thread (POSIX); returns the previous mask, or None where unsupported."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def release_interrupts(held: Any) -> None:
    if held is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[Any]:
    """Open `path` for binary writing; the file appears (renamed from a temp sibling) only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Ctrl-C between mkstemp creating the file and the `try` below would leave it behind: hold SIGINT and
    # SIGTERM until inside the `try`, where the interrupt (raised as soon as they are unblocked) cleans up.
    held = hold_interrupts()
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        release_interrupts(held)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file + fsync + rename)."""
    with atomic_open(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(
    tensors: dict[str, Any], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """`safetensors.torch.save` to bytes, then an atomic write (tensors are made contiguous)."""
    from safetensors.torch import save

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(contiguous, metadata=metadata))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` whole.

    On an exception the temporary folder is removed and `target` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, target.name)
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} already exists")
            old = make_temp_dir(target.parent, target.name)  # an empty folder a folder can be renamed over
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # put the previous folder back: nothing is lost
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
