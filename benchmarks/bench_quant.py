"""qlorakit 4-bit kernels and Linear4bit side by side with bitsandbytes (and torchao's NF4 for reference).

    python benchmarks/bench_quant.py            # 4096 x 4096 weight, 1024 tokens, 2 threads
    python benchmarks/bench_quant.py --quick    # small sizes, a smoke run

Prints medians (and minima) over repeats and ratios of medians (> 1 means qlorakit is faster). Every implementation runs in this one
process on the same weights and inputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

_MINIMA: dict[float, float] = {}  # median -> minimum of the same run, shown next to the median


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    median = statistics.median(times) * 1e3
    _MINIMA[median] = min(times) * 1e3
    return median


def row(label: str, ms: float | None, extra: str = "") -> None:
    shown = "n/a" if ms is None else f"{ms:10.2f} ms (min {_MINIMA.get(ms, ms):8.2f})"
    print(f"  {label:<44} {shown:>28}  {extra}")


def ratio(base: float | None, ours: float | None) -> str:
    return "" if base is None or ours is None else f"x{base / ours:.2f}"


def measure_compile() -> None:
    """First compile into an empty cache, then a cached load, each in a fresh process."""
    probe = (
        "import time; t = time.perf_counter(); from qlorakit import native; from qlorakit.quant import kernels; ok = kernels.available(); "
        "print(ok, kernels.isa(), native.load_seconds, time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "QLORAKIT_CACHE": cache, "QLORAKIT_NO_KERNELS": ""}
        print("C++ extension (fresh processes):")
        for label in ("first compile", "cached load"):
            out = subprocess.run(
                [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=False
            )
            fields = out.stdout.split()
            if len(fields) != 4 or fields[0] != "True":
                print(f"  {label}: failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
                return
            print(
                f"  {label:<44} {float(fields[2]):10.3f} s   (isa {fields[1]}, import+load {float(fields[3]):.3f} s)"
            )


def bench_dequantize(w: torch.Tensor, blocksize: int, repeats: int) -> None:
    import bitsandbytes.functional as bnbf

    from qlorakit.quant import kernels
    from qlorakit.quant.blockwise import dequantize_4bit, dequantize_blocks_reference, quantize_4bit

    n = w.numel()
    print(f"\nDequantize {tuple(w.shape)} NF4 -> bf16 (blocksize {blocksize}):")
    packed, state = quantize_4bit(w, blocksize, "nf4", double_quant=False)
    absmax = state.real_absmax()
    bnb_packed, bnb_state = bnbf.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=False, quant_type="nf4"
    )
    bnb_ms = median_ms(lambda: bnbf.dequantize_4bit(bnb_packed, bnb_state), repeats)
    row("bitsandbytes dequantize_4bit", bnb_ms, f"{n / bnb_ms / 1e6:.2f} G elem/s")
    if kernels.available():
        ms = median_ms(
            lambda: kernels.dequantize_blocks_cpu(packed, absmax, state.code, blocksize, n, torch.bfloat16),
            repeats,
        )
        row(
            f"qlorakit kernel ({kernels.isa()})",
            ms,
            f"{n / ms / 1e6:.2f} G elem/s  {ratio(bnb_ms, ms)} vs bnb",
        )
    dq_packed, dq_state = quantize_4bit(w, blocksize, "nf4", double_quant=True)
    ms = median_ms(lambda: dequantize_4bit(dq_packed, dq_state, torch.bfloat16), repeats)
    row(
        "qlorakit dequantize_4bit (double quant)",
        ms,
        f"{n / ms / 1e6:.2f} G elem/s  {ratio(bnb_ms, ms)} vs bnb",
    )
    ms = median_ms(
        lambda: dequantize_blocks_reference(packed, absmax, state.code, blocksize, n, torch.bfloat16), repeats
    )
    row("qlorakit plain-torch reference", ms, f"{n / ms / 1e6:.2f} G elem/s  {ratio(bnb_ms, ms)} vs bnb")
    nf4 = _torchao_nf4(w.to(torch.bfloat16), blocksize)
    if nf4 is not None:
        ms = median_ms(nf4.get_original_weight, repeats)
        row(
            "torchao NF4Tensor.get_original_weight",
            ms,
            f"{n / ms / 1e6:.2f} G elem/s  {ratio(bnb_ms, ms)} vs bnb",
        )


def _torchao_nf4(w: torch.Tensor, blocksize: int):
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        return None
    return to_nf4(w, block_size=blocksize, scaler_block_size=256)


def bench_quantize(w: torch.Tensor, blocksize: int, repeats: int) -> None:
    import bitsandbytes.functional as bnbf

    from qlorakit.quant import kernels
    from qlorakit.quant.blockwise import quantize_4bit, quantize_blocks_reference
    from qlorakit.quant.codes import NF4_CODE

    print(f"\nQuantize {tuple(w.shape)} fp32 -> NF4 (blocksize {blocksize}):")
    reps = max(1, repeats // 2)
    for dq in (False, True):
        bnb_ms = median_ms(
            lambda dq=dq: bnbf.quantize_4bit(
                w, blocksize=blocksize, compress_statistics=dq, quant_type="nf4"
            ),
            reps,
        )
        ms = median_ms(lambda dq=dq: quantize_4bit(w, blocksize, "nf4", double_quant=dq), reps)
        tag = "+ double quant" if dq else "no double quant"
        row(f"bitsandbytes quantize_4bit ({tag})", bnb_ms)
        row(f"qlorakit quantize_4bit ({tag})", ms, f"{ratio(bnb_ms, ms)} vs bnb")
    flat = w.reshape(-1).contiguous()
    if kernels.available():
        row(
            "qlorakit kernel only",
            median_ms(lambda: kernels.quantize_blocks_cpu(flat, NF4_CODE, blocksize), reps),
        )
    row(
        "qlorakit plain-torch reference",
        median_ms(lambda: quantize_blocks_reference(flat, NF4_CODE, blocksize), reps),
    )
    if _torchao_nf4(w[:64].to(torch.bfloat16), blocksize) is not None:
        wb = w.to(torch.bfloat16)
        row("torchao to_nf4 (bf16 input)", median_ms(lambda: _torchao_nf4(wb, blocksize), reps))


def _saved_mb(layer: nn.Module, fn: Callable[[], object]) -> tuple[float, float]:
    """MB that autograd saves for backward: (new tensors, references to the layer's own buffers/params)."""
    own = {t.untyped_storage().data_ptr() for t in [*layer.buffers(), *layer.parameters()]}
    new = shared = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal new, shared
        size = t.numel() * t.element_size()
        if t.untyped_storage().data_ptr() in own:
            shared += size
        else:
            new += size
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return new / 2**20, shared / 2**20


def bench_linear(w: torch.Tensor, bias: torch.Tensor, tokens: int, dtype: torch.dtype, repeats: int) -> None:
    import bitsandbytes as bnb

    from qlorakit.quant.linear import Linear4bit

    out_f, in_f = w.shape
    base = nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.copy_(w)
        base.bias.copy_(bias)
    ours = Linear4bit.from_linear(base, compute_dtype=dtype)
    dense = nn.Linear(in_f, out_f, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(ours.dequantize(dtype))
        dense.bias.copy_(bias.to(dtype))
    theirs = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=dtype, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit(
        w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    theirs.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    theirs = theirs.to("cpu")
    x = torch.randn(tokens, in_f, dtype=dtype)
    layers = {"nn.Linear": dense, "bnb.nn.Linear4bit": theirs, "qlorakit Linear4bit": ours}
    print(f"\nLinear {in_f} -> {out_f}, {tokens} tokens, compute {str(dtype).removeprefix('torch.')}:")

    def fwd(layer: nn.Module) -> Callable[[], object]:
        xg = x.clone().requires_grad_(True)
        return lambda: layer(xg)

    def fwd_bwd(layer: nn.Module) -> Callable[[], object]:
        xg = x.clone().requires_grad_(True)
        return lambda: layer(xg).sum().backward()

    def no_grad(layer: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return layer(x)

        return run

    for mode, make in (("forward", fwd), ("forward+input grad", fwd_bwd), ("no-grad forward", no_grad)):
        times = {name: median_ms(make(layer), repeats) for name, layer in layers.items()}
        for name, ms in times.items():
            extra = ""
            if name == "qlorakit Linear4bit":
                extra = (
                    f"{ratio(times['nn.Linear'], ms)} vs nn.Linear, "
                    f"{ratio(times['bnb.nn.Linear4bit'], ms)} vs bnb"
                )
            row(f"{mode:<19} {name}", ms, extra)
    saved = {name: _saved_mb(layer, fwd(layer)) for name, layer in layers.items()}
    print(
        "  saved for backward (new / refs to own buffers; bnb keeps its state on ctx, outside this hook): "
        + ", ".join(f"{k} {v[0]:.1f} / {v[1]:.1f} MB" for k, v in saved.items())
    )
    with torch.no_grad():
        diff = (ours(x).float() - theirs(x).float()).abs().max().item()
    print(f"  max |qlorakit - bnb| output difference: {diff:.3g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (1024 x 1024, 128 tokens)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-compile-check", action="store_true", help="skip the fresh-cache compile timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size, tokens = (1024, 128) if args.quick else (4096, 1024)
    repeats = args.repeats or (5 if args.quick else 7)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}, weight {size} x {size}, {tokens} tokens, "
        f"median of {repeats}"
    )
    if not args.no_compile_check:
        measure_compile()
    torch.manual_seed(0)
    w = torch.randn(size, size) * 0.02
    bias = torch.randn(size) * 0.02
    bench_dequantize(w, args.blocksize, repeats * 2)
    bench_quantize(w, args.blocksize, repeats)
    for dtype in (torch.float32, torch.bfloat16):
        bench_linear(w, bias, tokens, dtype, repeats if dtype == torch.float32 else max(2, repeats // 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
