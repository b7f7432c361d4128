"""The C++ CPU kernels: one shared library compiled on first use, loaded with ctypes.

Sources: `quant/csrc/nf4_cpu.cpp` (4-bit blockwise quantization, bitsandbytes semantics),
`lora/csrc/dropout_cpu.cpp` (LoRA dropout masks) and `csrc/block_cache.cpp` (the CPU allocator of
`qlorakit.memory`). They are compiled together with
`torch.utils.cpp_extension.load` into `$QLORAKIT_CACHE/ext/<key>` (default `~/.cache/qlorakit/ext/<key>`),
where the key hashes the sources, the torch and Python versions, the compiler and the CPU flags, so later
processes load the cached shared object in milliseconds. The sources include only `<ATen/Parallel.h>`,
`<c10/util/Half.h>` and c10's allocator headers, which keeps the first compile short, and export plain C
functions over raw pointers: the Python wrappers (`qlorakit.quant.kernels`, `qlorakit.lora.dropout`,
`qlorakit.memory`) validate every tensor and allocate the outputs. Work runs on torch's intra-op thread pool (`at::parallel_for`), so `torch.set_num_threads`
governs it.

Vector paths (AVX-512, AVX2, scalar) are chosen at run time inside the library. If anything fails (no compiler,
unsupported platform) a one-line warning is issued once, `available()` returns False and callers use their
plain-torch reference. `QLORAKIT_NO_KERNELS=1` disables the fast path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

_PACKAGE = Path(__file__).parent
SOURCES = (
    _PACKAGE / "quant" / "csrc" / "nf4_cpu.cpp",
    _PACKAGE / "lora" / "csrc" / "dropout_cpu.cpp",
    _PACKAGE / "csrc" / "block_cache.cpp",
)

_P, _I64, _I32, _U64, _U32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_uint64, ctypes.c_uint32
#: name -> (restype, argtypes) of every exported function.
_SIGNATURES = {
    "qlk_best_isa": (_I64, []),
    "qlk_dequantize": (ctypes.c_int, [_P, _P, _P, _I64, _I64, _I32, _P, _I64]),
    "qlk_quantize": (ctypes.c_int, [_P, _I64, _P, _P, _I64, _P, _P, _I64]),
    "qlk_dropout_mask": (ctypes.c_int, [_U64, _I64, _U32, _P, _I64]),
    "qlk_dropout_apply": (ctypes.c_int, [_P, _P, _I64, _I64, _P, _I64]),
    "qlk_block_cache_install": (ctypes.c_int, [_I64, _I64]),
    "qlk_block_cache_stats": (ctypes.c_int, [_P]),
    "qlk_block_cache_trim": (None, []),
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_isa = 0
#: Seconds the last successful load took (compile or cached load), for benchmarks.
load_seconds: float | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_version() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=False)
        return out.stdout.splitlines()[0] if out.stdout else cxx
    except (OSError, subprocess.SubprocessError):
        return cxx


def build_directory() -> Path:
    """The cache folder of the compiled library for these sources, torch, Python, compiler and CPU."""
    import torch  # here, not at the top: `qlorakit --help` imports this module (via memory) and stays fast

    key = hashlib.sha256()
    parts = [s.read_bytes() for s in SOURCES]
    parts += [torch.__version__.encode(), sys.version.encode(), _compiler_version().encode()]
    for part in (*parts, _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    root = Path(os.environ.get("QLORAKIT_CACHE") or Path.home() / ".cache" / "qlorakit")
    return root / "ext" / key.hexdigest()[:16]


def _load() -> ctypes.CDLL:
    from torch.utils.cpp_extension import load

    global load_seconds
    start = time.perf_counter()
    build_dir = build_directory()
    build_dir.mkdir(parents=True, exist_ok=True)
    # -fopenmp makes at::parallel_for use OpenMP like torch does; libgomp resolves to the copy torch loaded.
    path = load(
        name=f"qlorakit_native_{build_dir.name}",
        sources=[str(s) for s in SOURCES],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    load_seconds = time.perf_counter() - start
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library (compiled on first call), or None when it cannot be used here."""
    global _lib, _tried, _isa
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("QLORAKIT_NO_KERNELS", "").strip().lower() not in ("", "0", "false", "no"):
                return None
            missing = [str(s) for s in SOURCES if not s.is_file()]
            if missing:
                raise FileNotFoundError(", ".join(missing))
            _lib = _load()
            _isa = int(_lib.qlk_best_isa())
        except Exception as exc:  # any build or load failure means: use the reference
            _lib = None
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            warnings.warn(
                f"qlorakit: C++ CPU kernels unavailable ({type(exc).__name__}: {first_line}); "
                "using the slower plain-torch path",
                RuntimeWarning,
                stacklevel=3,
            )
        finally:
            _tried = True
    return _lib


def available() -> bool:
    """True when the compiled CPU kernels can be used in this process (compiles them on first call)."""
    return library() is not None


def best_isa() -> int:
    """The widest vector path the library may use here: 2 AVX-512, 1 AVX2, 0 scalar (0 when unavailable)."""
    library()
    return _isa


def isa() -> str:
    """The vector instruction set the kernels use here: "avx512", "avx2", "scalar" or "none" (unavailable)."""
    if library() is None:
        return "none"
    return {2: "avx512", 1: "avx2", 0: "scalar"}[_isa]


__all__ = ["SOURCES", "available", "best_isa", "build_directory", "isa", "library", "load_seconds"]
