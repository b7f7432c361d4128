"""Folders to write in that tests cannot get from permissions alone (the tests run as root, and root writes
through chmod): a read-only location and a small disk, both real tmpfs mounts where the privilege exists;
and snapshots of every file's bytes, to prove that a command changed nothing it should not have."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qlorakit.core.atomic import is_temporary


def _mount_tmpfs(root: Path, options: str) -> bool:
    if shutil.which("mount") is None:
        return False
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(root)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(root: Path) -> Iterator[Path]:
    """Make the empty folder `root` one nobody can write in, even root: a read-only tmpfs mount, else an
    immutable folder (chattr +i), else (not root) chmod 555. Root writes through permission bits, so chmod
    alone proves nothing; skips the test where none of these is possible."""
    if os.geteuid() != 0:
        root.chmod(0o555)
        yield root
        root.chmod(0o755)
    elif _mount_tmpfs(root, "ro,size=64k"):
        yield root
        subprocess.run(["umount", str(root)], check=True)
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(root)]).returncode == 0:
        yield root
        subprocess.run(["chattr", "-i", str(root)], check=True)
    else:
        pytest.skip("root without mount or chattr privileges: no folder here is read-only to root")


@contextlib.contextmanager
def small_disks(parent: Path) -> Iterator[Callable[[int], Path]]:
    """A maker of tmpfs mounts of a chosen size under `parent` (root only: an unprivileged user cannot make
    a full disk), all unmounted on exit; the maker skips the test where mounting is not possible."""
    mounted = []

    def make(size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a small file system needs a tmpfs mount, which needs root")
        root = parent / f"disk{len(mounted)}"
        root.mkdir()
        if not _mount_tmpfs(root, f"size={size}"):
            pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN)")
        mounted.append(root)
        return root

    yield make
    for root in mounted:
        subprocess.run(["umount", str(root)], check=True)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes (folders as None) under `root`, by relative path."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return out


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if is_temporary(p.name)]
