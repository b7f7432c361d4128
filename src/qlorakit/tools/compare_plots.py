"""The plots of `qlorakit compare`: PNG bytes from finished runs (matplotlib, imported when first needed).

Every function takes the runs in report order (run i is drawn in matplotlib's colour `C{i}` in every plot,
so a method keeps its colour from chart to chart) and returns the PNG's bytes; writing them is the
report's job.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from qlorakit.core.errors import DependencyError
from qlorakit.tools.run_folder import RunResult


def require_matplotlib() -> Any:
    """`matplotlib.pyplot` on the Agg backend, or DependencyError with the install command."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DependencyError(
            "the comparison plots need matplotlib: pip install matplotlib (or pip install 'qlorakit[metrics]')"
        ) from exc
    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    require_matplotlib().close(fig)
    return buf.getvalue()


def plot_loss_curves(runs: Sequence[RunResult]) -> bytes:
    """Train (lines) and validation (markers) loss of every run against the step, one axes; PNG bytes.

    The validation curve starts at step 0 with the base's loss before training, so a quantized base's
    drift shows where the curves begin."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, run in enumerate(runs):
        for split, style in (("train", "-"), ("val", "o--")):
            rows = [r for r in run.records if r.get("split") == split and r.get("loss") is not None]
            points = [(int(r["step"]), float(r["loss"])) for r in rows]
            if split == "val" and run.summary.val_loss_before is not None:
                points.insert(0, (0, run.summary.val_loss_before))
            if points:
                steps, losses = zip(*points, strict=True)
                ax.plot(steps, losses, style, color=f"C{i}", label=f"{run.label} {split}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / label token)")
    ax.grid(alpha=0.3)
    # two legend columns once there are more than two methods (eight methods make 16 entries)
    ax.legend(fontsize="small", ncol=1 if len(runs) <= 2 else 2)
    return _png(fig)


def _bars(ax: Any, runs: Sequence[RunResult], values: list[float], unit: str, fmt: str) -> None:
    bars = ax.bar([r.label for r in runs], values, color=[f"C{i}" for i in range(len(runs))])
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            format(value, fmt),
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
        )
    ax.set_ylabel(unit)
    ax.margins(y=0.15)
    if len(runs) > 2:  # long method names side by side overlap
        ax.tick_params(axis="x", labelrotation=30)


def plot_peak_memory(runs: Sequence[RunResult]) -> bytes:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(runs)), 4), dpi=100)
    _bars(ax, runs, [r.peak_rss_mib for r in runs], "peak RSS (MiB)", ",.0f")
    ax.set_title("Peak memory")
    return _png(fig)


def plot_speed(runs: Sequence[RunResult]) -> bytes:
    """Median step time and training throughput side by side; PNG bytes."""
    plt = require_matplotlib()
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(9, 2.4 * len(runs)), 4), dpi=100)
    _bars(left, runs, [r.median_step_time_s for r in runs], "seconds per step (median)", ".3f")
    left.set_title("Step time")
    _bars(right, runs, [r.tokens_per_s for r in runs], "tokens / s", ",.1f")
    right.set_title("Throughput")
    fig.tight_layout()
    return _png(fig)


def quality_axis(runs: Sequence[RunResult]) -> tuple[str, list[float | None]]:
    """The quality every run can be placed by: the validation loss after training when the runs have
    one, else the final train loss; (axis label, one value or None per run)."""
    if any(r.final_val_loss is not None for r in runs):
        return "validation loss after training (lower is better)", [r.final_val_loss for r in runs]
    return "final train loss (lower is better)", [r.summary.final_train_loss for r in runs]


def plot_memory_vs_quality(runs: Sequence[RunResult]) -> bytes:
    """Peak memory (x) against quality (y, see `quality_axis`), one labelled point per run; PNG bytes.

    The best trade-off sits bottom left. A run without the quality value is left out of the chart."""
    plt = require_matplotlib()
    name, values = quality_axis(runs)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, (run, value) in enumerate(zip(runs, values, strict=True)):
        if value is None:
            continue
        ax.scatter([run.peak_rss_mib], [value], s=60, color=f"C{i}", label=run.label, zorder=3)
        ax.annotate(run.label, (run.peak_rss_mib, value), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel("peak memory (RSS, MiB)")
    ax.set_ylabel(name)
    ax.set_title("Memory vs quality")
    ax.grid(alpha=0.3)
    ax.margins(x=0.2, y=0.2)
    return _png(fig)


__all__ = [
    "plot_loss_curves",
    "plot_memory_vs_quality",
    "plot_peak_memory",
    "plot_speed",
    "quality_axis",
    "require_matplotlib",
]
