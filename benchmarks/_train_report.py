"""bench_train's results: per-row medians, the table, the headline, the curves and the step-1 loss check.

Rows are keyed by bench_train's `Config` (method, dtype, gc, malloc, loss). A row's time is the median over
rounds of each worker's median step time (one number per process, so a slow process counts once); its
peak RSS is the median over rounds of the workers' own VmHWM. Ratios compare with the peers (every method
but qlorakit) at the same checkpointing setting: the fastest peer row for speed, the leanest for memory.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from _train_worker import METHODS

GIB = 2**30


@dataclass(frozen=True)
class Row:
    cfg: Any  # bench_train.Config
    s_step: float  # median seconds per timed step
    rss: float  # median peak RSS, bytes
    load_s: float  # median load + setup seconds
    tok_s: float
    rounds: int  # workers that succeeded


def summarize(results: dict[Any, list[dict]], tokens: int) -> list[Row]:
    rows = []
    for cfg, runs in results.items():
        ok = [r for r in runs if "error" not in r and r["times"]]
        if ok:
            s = statistics.median(statistics.median(r["times"]) for r in ok)
            rss = statistics.median(r["peak_rss"] for r in ok)
            load = statistics.median(r["load_s"] for r in ok)
            rows.append(Row(cfg, s, rss, load, tokens / s, len(ok)))
    # checkpointing, method, dtype, then the fused loss before the full one and the allocator modes
    return sorted(
        rows,
        key=lambda r: (
            r.cfg.gc,
            METHODS.index(r.cfg.method),
            r.cfg.dtype,
            r.cfg.loss != "fused",
            r.cfg.malloc,
        ),
    )


def is_default(cfg: Any, default: dict[str, str]) -> bool:
    """qlorakit as a user gets it: auto dtype, its default allocator setting, the training loop's loss."""
    return cfg.method == "qlorakit" and all(getattr(cfg, k) == v for k, v in default.items())


def best_peers(rows: list[Row], gc: bool) -> tuple[Row | None, Row | None]:
    """(fastest, leanest) peer row with checkpointing `gc`."""
    peers = [r for r in rows if r.cfg.method != "qlorakit" and r.cfg.gc == gc]
    if not peers:
        return None, None
    return min(peers, key=lambda r: r.s_step), min(peers, key=lambda r: r.rss)


def _name(cfg: Any) -> str:
    return f"{cfg.method} {cfg.dtype} malloc={cfg.malloc}" + (
        f" loss={cfg.loss}" if cfg.method == "qlorakit" else ""
    )


def _ckpt(cfg: Any) -> str:
    return "ckpt on " if cfg.gc else "ckpt off"


def print_table(rows: list[Row], default: dict[str, str]) -> None:
    print(
        "\nall rows (* = qlorakit default; speed-up = fastest peer's s/step / this row's; RSS ratio = this "
        "row's peak / leanest peer's; peers compared at the same checkpointing setting)"
    )
    head = f"{'method':10} {'loss':5} {'dtype':5} {'malloc':6} {'ckpt':4} {'s/step':>8} {'tok/s':>7} "
    print(head + f"{'peak GiB':>8} {'load s':>6} {'speed-up':>8} {'RSS ratio':>9} {'n':>2}")
    for r in rows:
        fastest, leanest = best_peers(rows, r.cfg.gc)
        up = f"{fastest.s_step / r.s_step:.2f}x" if fastest else "-"
        mem = f"{r.rss / leanest.rss:.2f}" if leanest else "-"
        c = r.cfg
        print(
            f"{c.method:10} {c.loss:5} {c.dtype:5} {c.malloc:6} {'on' if c.gc else 'off':4} {r.s_step:8.3f} "
            f"{r.tok_s:7.0f} {r.rss / GIB:8.3f} {r.load_s:6.1f} {up:>8} {mem:>9} {r.rounds:>2}"
            + (" *" if is_default(c, default) else "")
        )


def print_headline(rows: list[Row], default: dict[str, str], auto: str) -> None:
    """qlorakit's default row against the fastest and the leanest peer row, per checkpointing setting."""
    note = "" if default["dtype"] == auto else f" (its auto dtype, {auto}, was not run)"
    print(f"\nheadline: qlorakit default [{default['dtype']}, malloc {default['malloc']}, fused loss]{note}")
    for gc in sorted({r.cfg.gc for r in rows}):
        ours = next((r for r in rows if r.cfg.gc == gc and is_default(r.cfg, default)), None)
        fastest, leanest = best_peers(rows, gc)
        tag = f"ckpt {'on' if gc else 'off'}"
        if ours is None or fastest is None or leanest is None:
            print(f"  {tag}: no qlorakit default row or no peer rows to compare")
            continue
        print(
            f"  {tag}: {ours.s_step:.3f} s/step, {ours.rss / GIB:.3f} GiB\n"
            f"    speed vs fastest peer ({_name(fastest.cfg)}, {fastest.s_step:.3f} s/step): "
            f"{fastest.s_step / ours.s_step:.2f}x (> 1: qlorakit faster)\n"
            f"    peak RSS vs leanest peer ({_name(leanest.cfg)}, {leanest.rss / GIB:.3f} GiB): "
            f"{ours.rss / leanest.rss:.2f}x (< 1: qlorakit leaner)"
        )


def print_curves(curves: dict[Any, list[dict]]) -> None:
    if not curves:
        return
    steps = max(len(rs[0].get("losses", [])) for rs in curves.values())
    print(f"\nsame learning: loss on the fixed batch over {steps} steps")
    for cfg, (r,) in curves.items():
        if "error" in r:
            print(f"  {_name(cfg):42} {_ckpt(cfg)} failed: {r['error']}")
            continue
        ls = r["losses"]
        shown = " ".join(f"{x:.3f}" for x in ls[:: max(1, len(ls) // 10)])
        print(f"  {_name(cfg):42} {_ckpt(cfg)} first {ls[0]:.4f} last {ls[-1]:.4f} | {shown}")
    for dtype in sorted({c.dtype for c in curves}):
        last = [rs[0]["losses"][-1] for c, rs in curves.items() if c.dtype == dtype and "losses" in rs[0]]
        if len(last) > 1:
            print(f"  {dtype}: final losses within {max(last) - min(last):.4f} of each other")


# Allowed spread of the step-1 losses (max - min over every worker of one dtype) relative to the loss.
# bench_train gives every method the very same weights (see PROJ_WEIGHT there), so they differ only in
# rounding. fp32: every operation is fp32 and only the summation order differs (blocked matmuls, the
# fused head's vocabulary blocks): about sqrt(K) unit roundoffs per dot product (K <= 2816: ~53 u, with
# u = 2^-24), carried through the layers: 2^9 u = 2^-15 ~ 3e-5. bf16 must be looser: the methods round
# different intermediates to bf16 (PEFT's k-bit preparation keeps norms and embeddings in fp32 for
# bitsandbytes, qlorakit's head rounds per vocabulary block), each moving a value by up to u = 2^-8
# relative; those per-token errors change sign and largely cancel in the mean over the batch's tokens,
# so a quarter of u, 2^-10 ~ 1e-3, bounds it with room for the systematic part. Measured on the --quick
# model: fp32 spread 0, bf16 2.7e-5 (bitsandbytes' fp32 norms against the rest).
FIRST_LOSS_RTOL = {"fp32": 2.0**-15, "bf16": 2.0**-10}


def check_first_losses(results: dict[Any, list[dict]], *, quiet: bool) -> bool:
    """True when, per dtype, every worker's loss before any update is within FIRST_LOSS_RTOL of all others.

    Prints one line per dtype (none when `quiet` and it passes), and every row's losses when it fails.
    """
    ok = True
    for dtype in sorted({c.dtype for c in results}):
        firsts = {c: [r["losses"][0] for r in rs if "losses" in r] for c, rs in results.items()}
        firsts = {c: v for c, v in firsts.items() if v and c.dtype == dtype}
        if not firsts:
            continue
        values = [x for v in firsts.values() for x in v]
        spread, tol = max(values) - min(values), FIRST_LOSS_RTOL[dtype] * abs(statistics.median(values))
        ok = ok and spread <= tol
        if quiet and spread <= tol:
            continue
        print(
            f"step-1 loss, {dtype}: {min(values):.7f} to {max(values):.7f} over {len(values)} workers, spread "
            f"{spread:.3g} {'<=' if spread <= tol else '>'} tolerance {tol:.3g} "
            f"({FIRST_LOSS_RTOL[dtype]:.2g} x loss): {'ok' if spread <= tol else 'FAILED'}"
        )
        if spread > tol:
            for c, v in firsts.items():
                print(f"  {_name(c):42} {_ckpt(c)} {' '.join(f'{x:.7f}' for x in sorted(set(v)))}")
    return ok
