"""What the benchmarks share: a description of the machine, and interleaved timing.

A benchmark result means little without the machine it ran on: the CPU model, the instruction-set flags
that pick the kernels (AVX2 / AVX-512 for the 4-bit codecs, AVX512-BF16 / AMX for bf16 matmuls: without
them oneDNN emulates bf16 several times slower than fp32) and the library versions of both sides.

Timing A then B lets a change of machine load (other users, thermal state, a neighbour's build) land on
one side only. `interleaved_ms` runs the candidates round-robin (A, B, A, B, ...), so slow spells hit all
of them, and reports every sample so callers take medians.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable

#: The /proc/cpuinfo flags that decide which kernels run (see the module doc).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
#: Both sides of every comparison, by distribution name.
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "torchao")


def cpu_model_and_flags() -> tuple[str, dict[str, bool]]:
    """(CPU model name, {flag: present} for CPU_FLAGS); off Linux the model is platform.processor()."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or "unknown", {f: f in flags for f in CPU_FLAGS}


def package_versions() -> dict[str, str]:
    """Installed versions of PACKAGES ("not installed" for a missing one), without importing them."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment() -> dict[str, object]:
    """The machine and software a result belongs to, as JSON-ready values."""
    model, flags = cpu_model_and_flags()
    return {
        "cpu_model": model,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": package_versions(),
    }


def print_environment(env: dict[str, object]) -> None:
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in env["cpu_flags"].items())
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    print(f"cpu: {env['cpu_model']} ({env['cpu_count']} logical CPUs); {flags}")
    print(f"python {env['python']}; {versions}")


def interleaved_ms(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Milliseconds per call of each function, run round-robin: `repeats` samples per name.

    Each function is warmed up `warmup` times first (one-time costs: lazy imports, kernel loading, page
    faults of fresh buffers), also round-robin.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def speedup(reference: float | None, ours: float | None) -> str:
    """'x1.23': how many times faster `ours` is than `reference` (times); '' when either is missing."""
    return "" if reference is None or ours is None else f"x{reference / ours:.2f}"
