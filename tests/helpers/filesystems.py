"""Folders to write in that tests cannot get from permissions alone (the tests run as root, and root writes
through chmod): a read-only location and a small disk, both real tmpfs mounts where the privilege exists;
and snapshots of every file's bytes, to prove that a command changed nothing it should not have."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qlorakit.atomic import is_temporary


def _mount_tmpfs(root: Path, options: str) -> bool:
    if shutil.which("mount") is None:
        return False
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(root)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory):
    """A folder nobody can write in, even root: a read-only tmpfs mount, else an immutable folder (chattr
    +i), else (not root) chmod 555. Root writes through permission bits, so chmod alone proves nothing."""
    root = tmp_path_factory.mktemp("read-only")
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


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of a chosen size (root only: an unprivileged user cannot make a full disk)."""
    mounted = []

    def make(size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a small file system needs a tmpfs mount, which needs root")
        root = tmp_path / f"disk{len(mounted)}"
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
