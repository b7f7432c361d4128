"""Process memory: freed tensors leave the resident set, without a page fault for every new tensor.

CPU tensors come from the C allocator. glibc serves large blocks with mmap, but its threshold is
*dynamic*: once a block of N bytes is freed it raises the threshold to N (up to 32 MiB), so from then on
every tensor up to that size comes from the heap, and freed heap memory interleaved with live
allocations is rarely returned to the system. A training step allocates and frees thousands of
activation and dequantization tensors of 1-30 MB, so the process keeps a large amount of freed memory
resident: on the 168M-parameter benchmark Llama (benchmarks/bench_train.py, bf16, no checkpointing) the
peak is 1.34 GiB where the live tensors need ~1.0 GiB.

Fixing glibc's threshold at 1 MiB (mode `mmap`) gives every large tensor its own mapping, returned the
moment it is freed: peak 0.99 GiB. But every new tensor then maps fresh zeroed pages, one page fault per
4 KiB: 4.2M faults instead of 0.46M for the same run, and twice the step time (2.92 vs 1.44 s/step on a
CPU with native bf16; 8.3 vs 5.4 s with fp32 compute on one without).

The default mode, `cache`, keeps the mappings and drops the faults: a small C++ allocator
(`csrc/block_cache.cpp`, installed as torch's CPU allocator) maps each tensor of 1 MiB or more on its
own and, when it is freed, keeps the mapping in a cache keyed by size class (request rounded up to 1/8 of
its power of two) to hand out again. Training repeats the same shapes every step, so almost every request
is a cache hit: 0.43M faults, fewer than glibc's default, for a peak of 1.06 GiB. The cache holds at most
`QLORAKIT_BLOCK_CACHE_MIB` (default 256) MiB of free blocks and unmaps the least recently freed beyond
that, so the peak stays within that much of the live tensors. Smaller tensors, and everything that is not
a torch tensor, go to glibc with the fixed 1 MiB threshold as in `mmap` mode.

`configure_allocator` is called by the `qlorakit` command line at start-up (commands that compute);
library users call it themselves if they want it. `QLORAKIT_MALLOC_TUNING` chooses the mode: unset, `1`
or `cache` (the default), `mmap` (memory first: the fixed threshold alone), `0`/`off` (glibc's default:
speed first, ~30% more memory). Without the compiled kernels the `cache` mode falls back to `mmap`. Other C
libraries (musl, jemalloc or tcmalloc via LD_PRELOAD) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

from qlorakit.core import native
from qlorakit.core.errors import ConfigError

SOURCE = native.register(
    Path(__file__).parent / "csrc" / "block_cache.cpp",
    {
        "qlk_block_cache_install": (ctypes.c_int, [ctypes.c_int64, ctypes.c_int64]),
        "qlk_block_cache_stats": (ctypes.c_int, [ctypes.c_void_p]),
        "qlk_block_cache_trim": (None, []),
    },
)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks of at least this many bytes get their own mapping.
DEFAULT_MMAP_THRESHOLD = 1 << 20
#: Free bytes the block cache may hold (`QLORAKIT_BLOCK_CACHE_MIB` overrides).
DEFAULT_BLOCK_CACHE_BYTES = 256 << 20
MODES = ("cache", "mmap", "off")
MODE_ENV, CACHE_ENV = "QLORAKIT_MALLOC_TUNING", "QLORAKIT_BLOCK_CACHE_MIB"

_mode: str | None = None  # what configure_allocator applied in this process


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def requested_mode() -> str:
    """The allocator mode `QLORAKIT_MALLOC_TUNING` asks for: "cache" (default), "mmap" or "off"."""
    raw = os.environ.get(MODE_ENV, "").strip().lower()
    if raw in ("", "1", "true", "yes", "on", "cache"):
        return "cache"
    if raw in ("0", "false", "no", "off"):
        return "off"
    if raw == "mmap":
        return "mmap"
    raise ConfigError(
        f"{MODE_ENV}={raw!r}: use cache (the default), mmap (memory first) or 0 (glibc's default)"
    )


def block_cache_bytes() -> int:
    """The block cache's bound on free bytes: `QLORAKIT_BLOCK_CACHE_MIB` MiB, else 256 MiB."""
    raw = os.environ.get(CACHE_ENV, "").strip()
    if not raw:
        return DEFAULT_BLOCK_CACHE_BYTES
    if not raw.isdigit():
        raise ConfigError(
            f"{CACHE_ENV}={raw!r}: give a whole number of MiB, e.g. 256 (0 keeps no free blocks)"
        )
    return int(raw) << 20


def _fix_mmap_threshold(libc: ctypes.CDLL, threshold: int) -> bool:
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    return ok and libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold) == 1


def configure_allocator(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Apply the mode of `QLORAKIT_MALLOC_TUNING` (see the module docstring); True when anything applied.

    Idempotent. A no-op returning False off glibc or with QLORAKIT_MALLOC_TUNING=0.
    """
    global _mode
    mode = requested_mode()
    if mode == "off" or _mode is not None:
        return _mode is not None
    libc = _glibc()
    if libc is None or not _fix_mmap_threshold(libc, mmap_threshold):
        return False
    _mode = "mmap"
    lib = native.library(SOURCE) if mode == "cache" else None
    if lib is not None:
        lib.qlk_block_cache_install(mmap_threshold, block_cache_bytes())
        _mode = "cache"
    return True


def allocator_mode() -> str:
    """The mode applied in this process: "cache", "mmap", or "off" (nothing applied)."""
    return _mode or "off"


def block_cache_stats() -> dict[str, int] | None:
    """Bytes mapped (live + free) and free in the block cache, its hits and fresh mappings; None if not installed."""
    lib = native.library(SOURCE) if _mode == "cache" else None
    out = (ctypes.c_int64 * 4)()
    if lib is None or not lib.qlk_block_cache_stats(out):
        return None
    return dict(zip(("mapped_bytes", "cached_bytes", "hits", "mappings"), out, strict=True))


def trim_block_cache() -> None:
    """Unmap every free block the cache holds (e.g. before handing memory to another program)."""
    lib = native.library(SOURCE) if _mode == "cache" else None
    if lib is not None:
        lib.qlk_block_cache_trim()


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes.

    Linux: `VmHWM` of /proc/self/status, the high-water mark of this program alone. `ru_maxrss` is not
    used there because a child started with fork + exec inherits its parent's peak (a training run
    launched from a big notebook process would report the notebook's memory). Elsewhere: ru_maxrss
    (KiB on Linux/BSD, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


__all__ = [
    "DEFAULT_BLOCK_CACHE_BYTES",
    "DEFAULT_MMAP_THRESHOLD",
    "MODES",
    "allocator_mode",
    "block_cache_bytes",
    "block_cache_stats",
    "configure_allocator",
    "peak_rss_bytes",
    "requested_mode",
    "trim_block_cache",
]
