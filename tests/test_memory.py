"""configure_allocator: freed large tensors leave the resident set (glibc)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from qlorakit.memory import configure_allocator

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning targets glibc malloc")

_PROBE = """
import os, sys, torch
from qlorakit.memory import configure_allocator
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
applied = configure_allocator()
keep, before = [], rss()
for i in range(60):  # 3 MB activations freed in between long-lived small tensors, like a training step
    big = torch.ones(3 << 18)
    keep.append(torch.ones(1000))
    big.add_(1)
    del big
torch.ones(8 << 20).add_(1)  # one 32 MB block: glibc would raise its mmap threshold to 32 MB here
for i in range(60):
    big = torch.ones(3 << 18)
    keep.append(torch.ones(1000))
    del big
print(applied, rss() - before)
"""


def _run(env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PROBE)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr
    applied, grown = out.stdout.split()
    return applied, int(grown)


@glibc_only
def test_freed_tensors_leave_the_resident_set():
    applied, grown = _run({})
    assert applied == "True"
    assert grown < 4 << 20, f"RSS grew by {grown / 2**20:.1f} MiB after freeing every large tensor"


@glibc_only
def test_can_be_turned_off_and_is_idempotent():
    applied, _ = _run({"QLORAKIT_MALLOC_TUNING": "0"})
    assert applied == "False"
    assert configure_allocator() and configure_allocator()


def test_peak_rss_is_this_programs_own():
    """A child started from this (bigger) process reports its own peak, not the inherited one."""
    import torch

    from qlorakit.memory import peak_rss_bytes

    ballast = torch.ones(64 << 20)  # 256 MB in this process
    code = "from qlorakit.memory import peak_rss_bytes; print(peak_rss_bytes())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child = int(out.stdout)
    assert 0 < child < peak_rss_bytes() - ballast.numel() * 4 // 2
