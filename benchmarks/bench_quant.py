"""qlorakit's 4-bit codec and Linear4bit against bitsandbytes (and torchao's NF4 for reference), on the CPU.

Workload: one 4096 x 4096 weight (N(0, 0.02)), NF4, blocksize 64; Linear 4096 -> 4096 on 1024 tokens.
- quantize and dequantize, each with and without double quantization on both sides (bitsandbytes'
  `compress_statistics` = qlorakit's `double_quant`), in fp32 and bf16 (the weight's dtype, which is also
  bitsandbytes' output dtype), plus qlorakit's raw kernel and its plain-torch reference, and torchao's
  NF4Tensor (whose block scales are always quantized: it sits with the double-quant rows);
- Linear4bit (double quant on both sides) forward, forward + input grad, no-grad forward, beside a dense
  nn.Linear, in fp32 and bf16 compute; what autograd saves; the output difference.
All candidates of one comparison run interleaved (A, B, A, B, ...) after a round of warm-up, so a change of
machine load hits all of them; each row is the median (and minimum) of `--repeats` calls (default 21;
`--linear-repeats`, default 7, for the layers, whose calls are matmul-bound and ~100x longer). Ratios are
bitsandbytes' median / qlorakit's (> 1: qlorakit faster). Every implementation runs in this one process.

    python benchmarks/bench_quant.py            # 4096 x 4096 weight, 1024 tokens, 2 threads
    python benchmarks/bench_quant.py --quick    # 1024 x 1024, 128 tokens, no compile timing: a smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch
from torch import nn

from _common import environment, interleaved_ms, median, print_environment, speedup
from qlorakit.quant import kernels
from qlorakit.quant.blockwise import (
    dequantize_4bit,
    dequantize_blocks,
    quantize_4bit,
    quantize_blocks_reference,
)
from qlorakit.quant.codes import NF4_CODE
from qlorakit.quant.linear import Linear4bit
from qlorakit.quant.state import QuantState

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def print_rows(samples: dict[str, list[float]], reference: str | None, numel: int | None = None) -> None:
    """One line per candidate: median and minimum ms, throughput, speed vs `reference` (bitsandbytes)."""
    ref = median(samples[reference]) if reference in samples else None
    for name, times in samples.items():
        ms = median(times)
        rate = f"{numel / ms / 1e6:7.2f} G elem/s" if numel else ""
        vs = f"{speedup(ref, ms)} vs bnb" if ref is not None and name != reference else ""
        print(f"  {name:<46} {ms:10.3f} ms (min {min(times):9.3f})  {rate}  {vs}".rstrip())


def measure_compile() -> None:
    """First compile into an empty cache, then a cached load, each in a fresh process."""
    probe = (
        "import time; t = time.perf_counter(); from qlorakit.core import native; from qlorakit.quant import kernels; "
        "ok = kernels.available(); print(ok, kernels.isa(), native.load_seconds, time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "QLORAKIT_CACHE": cache, "QLORAKIT_NO_KERNELS": ""}
        print("\nC++ extension (fresh processes):")
        for label in ("first compile", "cached load"):
            out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
            fields = out.stdout.split()
            if len(fields) != 4 or fields[0] != "True":
                print(f"  {label}: failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
                return
            print(
                f"  {label:<46} {float(fields[2]):10.3f} s  (isa {fields[1]}, import + load {float(fields[3]):.3f} s)"
            )


def torchao_nf4(w: torch.Tensor, blocksize: int) -> torch.Tensor | None:
    """torchao's NF4Tensor of `w` (its scales quantized per 256), or None without torchao."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        return None
    return to_nf4(w, block_size=blocksize, scaler_block_size=256)


def bench_dequantize(w: torch.Tensor, blocksize: int, repeats: int) -> None:
    import bitsandbytes.functional as bnbf

    for dq in (False, True):
        for dname, dtype in DTYPES.items():
            wd = w.to(dtype)  # bitsandbytes dequantizes to the dtype it quantized from
            b_packed, b_state = bnbf.quantize_4bit(
                wd, blocksize=blocksize, compress_statistics=dq, quant_type="nf4"
            )
            packed, state = quantize_4bit(wd, blocksize, "nf4", double_quant=dq)
            fns: dict[str, Callable[[], object]] = {
                "bitsandbytes dequantize_4bit": lambda p=b_packed, s=b_state: bnbf.dequantize_4bit(p, s),
                "qlorakit dequantize_4bit": lambda p=packed, s=state, d=dtype: dequantize_4bit(p, s, d),
            }
            if not dq:
                fns.update(_dequantize_internals(packed, state, dtype, with_reference=dname == "bf16"))
            nf4 = torchao_nf4(wd, blocksize) if dq else None
            if nf4 is not None:
                fns["torchao NF4Tensor.get_original_weight"] = nf4.get_original_weight
            tag = "double quant" if dq else "no double quant"
            print(
                f"\nDequantize {tuple(w.shape)} NF4 -> {dname} (blocksize {blocksize}, {tag}), interleaved:"
            )
            print_rows(interleaved_ms(fns, repeats), "bitsandbytes dequantize_4bit", w.numel())


def _dequantize_internals(
    packed: torch.Tensor, state: QuantState, dtype: torch.dtype, *, with_reference: bool
) -> dict[str, Callable[[], object]]:
    """qlorakit's C++ kernel alone and (slow, so once) its plain-torch reference, from the same blocks."""
    absmax, n, bs = state.real_absmax(), state.numel, state.blocksize
    fns: dict[str, Callable[[], object]] = {}
    if kernels.available():
        fns[f"qlorakit kernel only ({kernels.isa()})"] = lambda: kernels.dequantize_blocks_cpu(
            packed, absmax, state.code, bs, torch.empty(n, dtype=dtype)
        )
    if with_reference:
        fns["qlorakit plain-torch reference"] = lambda: dequantize_blocks(
            packed, absmax, state.code, bs, n, dtype, reference=True
        )
    return fns


def bench_quantize(w: torch.Tensor, blocksize: int, repeats: int) -> None:
    import bitsandbytes.functional as bnbf

    for dq in (False, True):
        for dname, dtype in DTYPES.items():
            wd = w.to(dtype)
            fns: dict[str, Callable[[], object]] = {
                "bitsandbytes quantize_4bit": lambda x=wd, dq=dq: bnbf.quantize_4bit(
                    x, blocksize=blocksize, compress_statistics=dq, quant_type="nf4"
                ),
                "qlorakit quantize_4bit": lambda x=wd, dq=dq: quantize_4bit(
                    x, blocksize, "nf4", double_quant=dq
                ),
            }
            if not dq and dtype == torch.float32:
                fns.update(_quantize_internals(w.reshape(-1).contiguous(), blocksize))
            if dq and torchao_nf4(wd[:64], blocksize) is not None:
                fns["torchao to_nf4"] = lambda x=wd: torchao_nf4(x, blocksize)
            tag = "double quant" if dq else "no double quant"
            print(f"\nQuantize {tuple(w.shape)} {dname} -> NF4 (blocksize {blocksize}, {tag}), interleaved:")
            print_rows(interleaved_ms(fns, repeats), "bitsandbytes quantize_4bit", w.numel())


def _quantize_internals(flat: torch.Tensor, blocksize: int) -> dict[str, Callable[[], object]]:
    """qlorakit's C++ kernel alone and its plain-torch reference on fp32 values [n]."""
    fns: dict[str, Callable[[], object]] = {}
    if kernels.available():
        fns["qlorakit kernel only"] = lambda: kernels.quantize_blocks_cpu(flat, NF4_CODE, blocksize)
    fns["qlorakit plain-torch reference"] = lambda: quantize_blocks_reference(flat, NF4_CODE, blocksize)
    return fns


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


def linear_layers(w: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The same weights as a dense layer, bitsandbytes' Linear4bit and qlorakit's (NF4 + double quant)."""
    import bitsandbytes as bnb

    out_f, in_f = w.shape
    base = nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.copy_(w)
        base.bias.copy_(bias)
    ours = Linear4bit.from_linear(base, compute_dtype=dtype, double_quant=True)
    dense = nn.Linear(in_f, out_f, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(ours.dequantize(dtype))
        dense.bias.copy_(bias.to(dtype))
    theirs = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=dtype, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit(
        w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    theirs.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return {"nn.Linear": dense, "bitsandbytes Linear4bit": theirs.to("cpu"), "qlorakit Linear4bit": ours}


def bench_linear(w: torch.Tensor, bias: torch.Tensor, tokens: int, dtype: torch.dtype, repeats: int) -> None:
    layers = linear_layers(w, bias, dtype)
    x = torch.randn(tokens, w.shape[1], dtype=dtype)
    print(
        f"\nLinear {w.shape[1]} -> {w.shape[0]}, {tokens} tokens, compute {str(dtype).removeprefix('torch.')}:"
    )

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

    for mode, make in (("forward", fwd), ("forward + input grad", fwd_bwd), ("no-grad forward", no_grad)):
        samples = interleaved_ms({f"{mode}: {name}": make(layer) for name, layer in layers.items()}, repeats)
        print_rows(samples, f"{mode}: bitsandbytes Linear4bit")
        dense, ours = median(samples[f"{mode}: nn.Linear"]), median(samples[f"{mode}: qlorakit Linear4bit"])
        print(f"  {mode + ': qlorakit vs nn.Linear':<46} {speedup(dense, ours):>10}")
    saved = {name: _saved_mb(layer, fwd(layer)) for name, layer in layers.items()}
    print(
        "  saved for backward (new / refs to own buffers; bnb keeps its state on ctx, outside this hook): "
        + ", ".join(f"{k} {v[0]:.1f} / {v[1]:.1f} MB" for k, v in saved.items())
    )
    with torch.no_grad():
        diff = (layers["qlorakit Linear4bit"](x).float() - layers["bitsandbytes Linear4bit"](x).float()).abs()
    print(f"  max |qlorakit - bitsandbytes| output difference: {diff.max().item():.3g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1024 x 1024, 128 tokens, no compile timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21, help="calls per quantize/dequantize candidate")
    parser.add_argument("--linear-repeats", type=int, help="calls per layer candidate (default 7; --quick 3)")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-compile-check", action="store_true", help="skip the fresh-cache compile timing")
    args = parser.parse_args(argv)
    bad = [
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in ("threads", "repeats") and v < 1
    ]
    if args.linear_repeats is not None and args.linear_repeats < 1:
        bad.append(f"--linear-repeats {args.linear_repeats}")
    if bad:
        parser.error(f"{', '.join(bad)}: must be 1 or more")
    torch.set_num_threads(args.threads)
    size, tokens = (1024, 128) if args.quick else (4096, 1024)
    linear_repeats = args.linear_repeats or (3 if args.quick else 7)
    print_environment(environment())
    print(
        f"torch cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
        f"qlorakit kernels {'(' + kernels.isa() + ')' if kernels.available() else 'unavailable'}; weight "
        f"{size} x {size}, {tokens} tokens; medians of {args.repeats} (layers: {linear_repeats}) interleaved calls"
    )
    if not (args.quick or args.no_compile_check):
        measure_compile()
    torch.manual_seed(0)
    w = torch.randn(size, size) * 0.02
    bias = torch.randn(size) * 0.02
    bench_dequantize(w, args.blocksize, args.repeats)
    bench_quantize(w, args.blocksize, args.repeats)
    for dtype in DTYPES.values():
        bench_linear(w, bias, tokens, dtype, linear_repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
