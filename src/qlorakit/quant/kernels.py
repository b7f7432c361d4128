"""The C++ CPU fast path for 4-bit blockwise quantization (bitsandbytes semantics, bit-identical results).

`csrc/nf4_cpu.cpp` is compiled on first use with `torch.utils.cpp_extension.load` into
`$QLORAKIT_CACHE/ext/<key>` (default `~/.cache/qlorakit/ext/<key>`), where the key hashes the source, the torch
and Python versions, the compiler and the CPU flags, so later processes load the cached shared object in
milliseconds. The source includes only `<ATen/Parallel.h>`, which keeps the first compile short, and exports
plain C functions over raw pointers: this module validates every tensor and allocates the outputs. Work runs
on torch's intra-op thread pool (`at::parallel_for`), so `torch.set_num_threads` governs it.

Vector paths (AVX-512, AVX2, scalar) are chosen at run time inside the library. If anything fails (no compiler,
unsupported platform) a one-line warning is issued once, `available()` returns False and callers use the
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

import torch

from qlorakit.errors import QuantizationError
from qlorakit.quant.codes import quantize_bounds

_SOURCE = Path(__file__).with_name("csrc") / "nf4_cpu.cpp"
_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_isa = 0
#: Seconds the last successful `_load` took (compile or cached load), for benchmarks.
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
    """The cache folder of the compiled extension for this source, torch, Python, compiler and CPU."""
    key = hashlib.sha256()
    for part in (
        _SOURCE.read_bytes(),
        torch.__version__.encode(),
        sys.version.encode(),
        _compiler_version().encode(),
        _cpu_flags().encode(),
    ):
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
        name=f"qlorakit_nf4_{build_dir.name}",
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    lib = ctypes.CDLL(str(path))
    lib.qlk_best_isa.restype = ctypes.c_int64
    lib.qlk_dequantize.restype = ctypes.c_int
    lib.qlk_dequantize.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int32]
    lib.qlk_dequantize.argtypes += [ctypes.c_void_p, ctypes.c_int64]
    lib.qlk_quantize.restype = ctypes.c_int
    lib.qlk_quantize.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.qlk_quantize.argtypes += [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    load_seconds = time.perf_counter() - start
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib, _tried, _isa
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("QLORAKIT_NO_KERNELS", "").strip().lower() not in ("", "0", "false", "no"):
                return None
            if not _SOURCE.is_file():
                raise FileNotFoundError(_SOURCE)
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
    return _library() is not None


def isa() -> str:
    """The vector instruction set the kernels use here: "avx512", "avx2", "scalar" or "none" (unavailable)."""
    if _library() is None:
        return "none"
    return {2: "avx512", 1: "avx2", 0: "scalar"}[_isa]


def _require() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise QuantizationError(
            "the qlorakit C++ CPU kernels are not available (see the earlier warning, or unset "
            "QLORAKIT_NO_KERNELS); call qlorakit.quant.blockwise instead, which falls back to plain torch"
        )
    return lib


def _check_cpu(name: str, t: torch.Tensor, dtype: torch.dtype, numel: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise QuantizationError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise QuantizationError(f"{name} is on {t.device}; the C++ kernels run on CPU tensors only")
    if t.dtype != dtype:
        raise QuantizationError(f"{name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise QuantizationError(f"{name} must be contiguous; call .contiguous() first")
    if numel is not None and t.numel() != numel:
        raise QuantizationError(
            f"{name} must have {numel} elements, got {t.numel()} (shape {tuple(t.shape)})"
        )


def _check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize < 2 or blocksize % 2:
        raise QuantizationError(f"blocksize must be a positive even integer, got {blocksize!r}")


def _isa_for(force_isa: int | None) -> int:
    if force_isa is None:
        return _isa
    if force_isa not in (0, 1, 2) or force_isa > _isa:
        raise QuantizationError(f"force_isa={force_isa} is not usable here (best is {_isa})")
    return force_isa


def dequantize_blocks_cpu(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    numel: int,
    out_dtype: torch.dtype,
    *,
    force_isa: int | None = None,
) -> torch.Tensor:
    """Dequantize 4-bit blocks: `out[i] = code[nibble_i] * absmax[i // blocksize]` in fp32, then cast (RNE).

    packed: uint8 [(numel + 1) // 2] or [(numel + 1) // 2, 1], high nibble first; absmax: fp32 [nblocks];
    code: fp32 [16]. Returns a flat tensor [numel] of out_dtype (float32, bfloat16 or float16).
    force_isa (0 scalar, 1 AVX2, 2 AVX-512) pins a code path; tests use it to compare them.
    """
    lib = _require()
    _check_blocksize(blocksize)
    if not isinstance(numel, int) or numel < 0:
        raise QuantizationError(f"numel must be a non-negative integer, got {numel!r}")
    if out_dtype not in _OUT_KINDS:
        raise QuantizationError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    _check_cpu("packed", packed, torch.uint8, (numel + 1) // 2)
    _check_cpu("absmax", absmax, torch.float32, -(-numel // blocksize))
    _check_cpu("code", code, torch.float32, 16)
    out = torch.empty(numel, dtype=out_dtype)
    if numel == 0:
        return out
    rc = lib.qlk_dequantize(
        packed.data_ptr(),
        absmax.data_ptr(),
        code.data_ptr(),
        blocksize,
        numel,
        _OUT_KINDS[out_dtype],
        out.data_ptr(),
        _isa_for(force_isa),
    )
    if rc != 0:
        raise QuantizationError("the C++ dequantize kernel failed in a worker thread")
    return out


def quantize_blocks_cpu(
    flat: torch.Tensor, code: torch.Tensor, blocksize: int, *, force_isa: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize fp32 values blockwise to 4-bit codes, byte-identical to bitsandbytes on CPU.

    flat: fp32 contiguous [n]; code: fp32 [16]. Returns (packed uint8 [(n + 1) // 2, 1] with the first
    element of each pair in the high nibble and an odd count padded with the code of 0.0, absmax fp32
    [ceil(n / blocksize)]). Full blocks scale by the fp32 reciprocal of max(absmax, 1e-38) and store absmax
    (0.0 for an all-zero block); a trailing partial block divides by max(absmax, 1e-38) and stores that
    clamped value, as bitsandbytes does.
    """
    lib = _require()
    _check_blocksize(blocksize)
    _check_cpu("flat", flat, torch.float32)
    if flat.dim() != 1:
        raise QuantizationError(f"flat must be 1-D, got shape {tuple(flat.shape)}; pass tensor.reshape(-1)")
    _check_cpu("code", code, torch.float32, 16)
    n = flat.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    if n == 0:
        return packed, absmax
    bounds, order = quantize_bounds(code)
    mids = bounds.contiguous()
    order = order.to(torch.uint8).contiguous()
    rc = lib.qlk_quantize(
        flat.data_ptr(),
        n,
        mids.data_ptr(),
        order.data_ptr(),
        blocksize,
        packed.data_ptr(),
        absmax.data_ptr(),
        _isa_for(force_isa),
    )
    if rc != 0:
        raise QuantizationError("the C++ quantize kernel failed in a worker thread")
    return packed, absmax


__all__ = [
    "available",
    "build_directory",
    "dequantize_blocks_cpu",
    "isa",
    "load_seconds",
    "quantize_blocks_cpu",
]
