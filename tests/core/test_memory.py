"""configure_allocator: freed large tensors leave the resident set, and (cache mode) are reused without faults."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from qlorakit.core import native
from qlorakit.core.errors import ConfigError
from qlorakit.core.memory import SOURCE, block_cache_bytes, configure_allocator, requested_mode

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning targets glibc malloc")

_PROBE = """
import json, os, resource, torch
from qlorakit.core.memory import allocator_mode, block_cache_stats, configure_allocator
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
applied = configure_allocator()
torch.ones(1 << 20).add_(1)  # warm up torch's own first-call allocations
keep, before, f0 = [], rss(), faults()
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
print(json.dumps({"applied": applied, "mode": allocator_mode(), "grown": rss() - before,
                  "faults": faults() - f0, "stats": block_cache_stats()}))
"""


def _run(env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PROBE)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_mmap_mode_returns_every_freed_large_tensor():
    r = _run({"QLORAKIT_MALLOC_TUNING": "mmap"})
    assert r["applied"] and r["mode"] == "mmap" and r["stats"] is None
    assert r["grown"] < 4 << 20, f"RSS grew by {r['grown'] / 2**20:.1f} MiB after freeing every large tensor"


@glibc_only
def test_glibc_default_keeps_freed_tensors_resident():
    """The problem the tuning solves (if glibc changes its policy, this tells us the tuning is moot).

    How much glibc keeps varies from process to process with its dynamic mmap threshold (measured on one
    machine: 6 MiB once, 138-377 MiB in other runs of the same probe), so the premise is that it keeps more
    than 16 MiB in at least one of three fresh processes; a glibc that returned freed tensors every time
    fails this."""
    runs = [_run({"QLORAKIT_MALLOC_TUNING": "0"}) for _ in range(3)]
    assert all(not r["applied"] and r["mode"] == "off" for r in runs)
    assert max(r["grown"] for r in runs) > 16 << 20, [r["grown"] for r in runs]


@glibc_only
@pytest.mark.skipif(not native.available(SOURCE), reason="C++ kernels could not be built here")
def test_cache_mode_reuses_blocks_instead_of_faulting_fresh_pages():
    cached = _run({})  # the default
    mmap = _run({"QLORAKIT_MALLOC_TUNING": "mmap"})
    assert cached["mode"] == "cache"
    stats = cached["stats"]
    # 120 allocations of the same 3 MiB size and one of 32 MiB: one mapping each size, the rest are hits.
    assert stats["mappings"] <= 4 and stats["hits"] >= 115, stats
    # mmap mode faults in every page of every 3 MiB tensor (768 pages x 120); the cache only the first time.
    assert mmap["faults"] > 60_000 and cached["faults"] < mmap["faults"] / 10, (cached, mmap)
    # What stays resident is bounded by the cache's cap: here the two freed blocks (3 + 32 MiB).
    assert cached["grown"] < 40 << 20
    assert stats["cached_bytes"] <= block_cache_bytes()


@glibc_only
@pytest.mark.skipif(not native.available(SOURCE), reason="C++ kernels could not be built here")
def test_cache_cap_bounds_the_free_bytes_it_keeps():
    r = _run({"QLORAKIT_BLOCK_CACHE_MIB": "8"})  # the 32 MiB block cannot stay; a 3 MiB one can
    assert r["mode"] == "cache"
    assert r["stats"]["cached_bytes"] <= 8 << 20
    assert r["grown"] < 12 << 20, f"RSS grew by {r['grown'] / 2**20:.1f} MiB with an 8 MiB cap"


@glibc_only
@pytest.mark.skipif(not native.available(SOURCE), reason="C++ kernels could not be built here")
def test_training_computes_the_same_with_every_allocator_mode():
    """Same losses bit for bit: the allocator changes where tensors live, never what they hold."""
    code = textwrap.dedent(
        """
        import json, torch
        from qlorakit.core.memory import configure_allocator
        configure_allocator()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(1024, 512)
        losses = []
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls use oneDNN's raw allocations
                loss = (model(x).float() - x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        print(json.dumps(losses))
        """
    )
    results = {}
    for mode in ("cache", "mmap", "0"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, "QLORAKIT_MALLOC_TUNING": mode},
        )
        assert out.returncode == 0, out.stderr
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    assert results["cache"] == results["mmap"] == results["0"]
    assert results["cache"][-1] < results["cache"][0]


def test_bad_settings_are_named_errors(monkeypatch):
    monkeypatch.setenv("QLORAKIT_MALLOC_TUNING", "fast")
    with pytest.raises(ConfigError, match="QLORAKIT_MALLOC_TUNING='fast'.*cache.*mmap"):
        requested_mode()
    monkeypatch.setenv("QLORAKIT_BLOCK_CACHE_MIB", "1GiB")
    with pytest.raises(ConfigError, match="QLORAKIT_BLOCK_CACHE_MIB='1GiB'.*MiB"):
        block_cache_bytes()


@glibc_only
def test_can_be_turned_off_and_is_idempotent():
    r = _run({"QLORAKIT_MALLOC_TUNING": "0"})
    assert r["applied"] is False
    assert configure_allocator() == configure_allocator()


def test_peak_rss_is_this_programs_own():
    """A child started from this (bigger) process reports its own peak, not the inherited one."""
    import torch

    from qlorakit.core.memory import peak_rss_bytes

    ballast = torch.ones(64 << 20)  # 256 MB in this process
    code = "from qlorakit.core.memory import peak_rss_bytes; print(peak_rss_bytes())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child = int(out.stdout)
    assert 0 < child < peak_rss_bytes() - ballast.numel() * 4 // 2
