"""The C++ CPU kernels: each package's sources compiled on first use into a shared library, loaded with ctypes.

This module knows no package's sources: each package hands it its own with `register(source, signatures)`
when its wrapper module is imported (`qlorakit.quant.kernels`: `quant/csrc/nf4_cpu.cpp`, 4-bit blockwise
quantization with bitsandbytes semantics, and `qlk_best_isa`, the one CPU probe; `qlorakit.lora.dropout`:
`lora/csrc/dropout_cpu.cpp`, LoRA dropout masks; `qlorakit.core.memory`: `core/csrc/block_cache.cpp`, the CPU
allocator). Each source is compiled on its first use with `torch.utils.cpp_extension.load` into
`$QLORAKIT_CACHE/ext/<key>` (default `~/.cache/qlorakit/ext/<key>`, see `qlorakit.core.paths`), where the key
hashes the source, the torch and Python versions, the compiler and the CPU flags, so later processes load the
cached shared object in milliseconds whatever order the packages were imported in. The sources include only
`<ATen/Parallel.h>`, `<c10/util/Half.h>` and c10's allocator headers, which keeps a compile short, and
export plain C functions over raw pointers: the Python wrappers validate every tensor and allocate the
outputs. Work runs on torch's intra-op thread pool (`at::parallel_for`), so `torch.set_num_threads` governs it.

Vector paths (AVX-512, AVX2, scalar) are chosen at run time inside the libraries. If anything fails (no
compiler, unsupported platform) a one-line warning is issued once, `available(source)` returns False and callers
use their plain-torch reference. `QLORAKIT_NO_KERNELS=1` disables the fast path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from qlorakit.core.paths import cache_root

_P, _I64, _I32, _U64, _U32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_uint64, ctypes.c_uint32
Signatures = dict[str, tuple[Any, list[Any]]]
"""Exported C function name -> (restype, argtypes), as ctypes types."""

_lock = threading.Lock()
#: source -> the signatures of the functions it exports, as handed in by its package.
_registered: dict[Path, Signatures] = {}
#: source -> its loaded library.
_loaded: dict[Path, ctypes.CDLL] = {}
_failed = False
#: Seconds the last successful load took (compile or cached load), for benchmarks.
load_seconds: float | None = None


def register(source: str | Path, signatures: Signatures) -> Path:
    """Hand a C++ source and the signatures of the C functions it exports to this builder.

    Called by each package's wrapper module at import time; returns the path to ask `library` with.
    """
    path = Path(source)
    with _lock:
        _registered.setdefault(path, dict(signatures))
    return path


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _compiler_version() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=False)
        return out.stdout.splitlines()[0] if out.stdout else cxx
    except (OSError, subprocess.SubprocessError):
        return cxx


def build_directory(source: Path) -> Path:
    """The cache folder of the compiled library of `source` for this torch, Python, compiler and CPU."""
    import torch  # here, not at the top: `qlorakit --help` imports this module (via memory) and stays fast

    key = hashlib.sha256()
    parts = [
        source.read_bytes(),
        torch.__version__.encode(),
        sys.version.encode(),
        _compiler_version().encode(),
    ]
    for part in (*parts, _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_root() / "ext" / key.hexdigest()[:16]


def _load(source: Path) -> ctypes.CDLL:
    from torch.utils.cpp_extension import load

    global load_seconds
    start = time.perf_counter()
    build_dir = build_directory(source)
    build_dir.mkdir(parents=True, exist_ok=True)
    # -fopenmp makes at::parallel_for use OpenMP like torch does; libgomp resolves to the copy torch loaded.
    path = load(
        name=f"qlorakit_{source.stem}_{build_dir.name}",
        sources=[str(source)],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _registered[source].items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    load_seconds = time.perf_counter() - start
    return lib


def _disabled() -> bool:
    return os.environ.get("QLORAKIT_NO_KERNELS", "").strip().lower() not in ("", "0", "false", "no")


def library(source: Path) -> ctypes.CDLL | None:
    """The loaded library of a registered `source` (compiled on first call), or None when the kernels cannot
    be used here."""
    lib = _loaded.get(source)
    if lib is not None or _failed:
        return lib
    with _lock:
        return _loaded.get(source) or _build(source)


def _build(source: Path) -> ctypes.CDLL | None:
    """Compile and load `source` (with the lock held); on any failure warn once and give every kernel up."""
    global _failed
    if _failed or _disabled():
        return None
    try:
        if source not in _registered:
            raise KeyError(f"{source} was not registered")
        if not source.is_file():
            raise FileNotFoundError(str(source))
        lib = _load(source)
    except Exception as exc:  # any build or load failure means: use the reference
        _failed = True
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        warnings.warn(
            f"qlorakit: C++ CPU kernels unavailable ({type(exc).__name__}: {first_line}); "
            "using the slower plain-torch path",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    _loaded[source] = lib
    return lib


def available(source: Path) -> bool:
    """True when the compiled kernels of the registered `source` can be used in this process (compiles them
    on first call)."""
    return library(source) is not None


def registered() -> tuple[Path, ...]:
    """The sources handed in so far (by the packages imported so far), e.g. to build them all up front."""
    return tuple(_registered)


__all__ = ["Signatures", "available", "build_directory", "library", "load_seconds", "register", "registered"]
