"""The 16-bit LoRA vs QLoRA comparison report, built from two finished `qlorakit train` output folders.

Each run folder holds what the training pipeline writes: `summary.json` (peak RSS, throughput, losses,
held-out exact match), `metrics.jsonl` (one record per logged step, `split` train or val), the adapter
(`adapter_model.safetensors`) and `config.yaml`. Nothing here trains: `read_run` reads a folder,
`build_report` turns two runs into Markdown (a pure function), and `write_report` adds the plots and writes
everything atomically. `qlorakit compare` (tools/compare_runs.py) runs the two trainings, then calls it.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlorakit.core.atomic import atomic_write_bytes, atomic_write_text
from qlorakit.core.dtypes import format_bytes
from qlorakit.core.errors import CheckpointError, DependencyError, QLoraKitError
from qlorakit.lora.peft_format import WEIGHTS_NAME
from qlorakit.models.shape import ModelShape
from qlorakit.tools.estimate.memory import CONFIG_OPTIMIZERS, estimate_memory
from qlorakit.train.metrics import JSONL, read_records
from qlorakit.train.report import SUMMARY, RunSummary, read_summary

REPORT = "report.md"
PLOTS = {"loss": "loss_curves.png", "memory": "peak_memory.png", "speed": "speed.png"}
# Keys of the resolved config that are allowed to differ between the two runs.
_EXPECTED_DIFFERENCES = ("quant.enabled", "output.dir")


@dataclass(frozen=True)
class RunResult:
    """One finished training run, as its output folder describes it."""

    label: str
    folder: Path
    summary: RunSummary
    records: list[dict[str, Any]]
    adapter_bytes: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_rss_mib(self) -> float:
        return self.summary.peak_rss_mib

    @property
    def mean_step_time_s(self) -> float:
        """Training time (forward, backward, optimizer; no evaluation) per optimizer step."""
        return self.summary.train_time_s / max(1, self.summary.steps)

    @property
    def median_step_time_s(self) -> float:
        """Median seconds per step over the logged intervals; the first interval (one-time warm-up such as
        allocator growth) is left out when there are others."""
        return median_step_time(self.records) or self.mean_step_time_s

    @property
    def tokens_per_s(self) -> float:
        return self.summary.tokens_per_s

    @property
    def final_val_loss(self) -> float | None:
        return self.summary.val_loss_after

    def compute_dtype(self, auto: str | None = None) -> str:
        """The run's compute dtype (also the dtype of a 16-bit base); `auto` names what "auto" resolved to."""
        name = self.config.get("quant", {}).get("compute_dtype", "n/a")
        return f"auto ({auto})" if name == "auto" and auto else str(name)


def median_step_time(records: Sequence[dict[str, Any]]) -> float | None:
    """Median of (elapsed time / steps) between consecutive `train` records; None without records.

    `elapsed_s` is the cumulative training time the loop logs, so a record every k steps gives k-step means.
    """
    rows = sorted((r for r in records if r.get("split") == "train"), key=lambda r: r["step"])
    points = [(0, 0.0)] + [(int(r["step"]), float(r["elapsed_s"])) for r in rows]
    rates = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(points, points[1:], strict=False) if s1 > s0]
    if not rates:
        return None
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def read_run(folder: str | Path, label: str) -> RunResult:
    """A finished run folder (see module doc); CheckpointError naming the missing file otherwise."""
    import yaml

    folder = Path(folder)
    summary_path = folder / SUMMARY
    if not summary_path.exists():
        raise CheckpointError(
            f"{summary_path} is missing: the {label} run did not finish (rerun it, or check its output)"
        )
    summary = read_summary(folder)
    adapter = folder / WEIGHTS_NAME
    if not adapter.is_file():
        raise CheckpointError(f"{adapter} is missing: the {label} run saved no adapter")
    config: dict[str, Any] = {}
    if (folder / "config.yaml").is_file():
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CheckpointError(f"cannot read {folder / 'config.yaml'}: {exc}") from exc
    records = read_records(folder / JSONL)
    return RunResult(label, folder, summary, records, adapter.stat().st_size, config)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def setting_differences(a: RunResult, b: RunResult) -> list[str]:
    """Resolved-config keys that differ between the runs besides the quantization switch and folder."""
    fa, fb = _flatten(a.config), _flatten(b.config)
    if not fa or not fb:
        return []
    keys = sorted((set(fa) | set(fb)) - set(_EXPECTED_DIFFERENCES))
    return [f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in keys if fa.get(k) != fb.get(k)]


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _exact(s: RunSummary) -> str:
    n = s.samples
    return f"{s.exact_before}/{n} → {s.exact_after}/{n}"


def _estimate(run: RunResult, auto_dtype: str | None) -> str:
    peak = estimated_peak(run, auto_dtype)
    return "n/a" if peak is None else f"{peak / 2**20:,.0f} MiB"


def estimated_peak(run: RunResult, auto_dtype: str | None) -> int | None:
    """`qlorakit estimate`'s peak RSS for the run's settings at `data.max_length` tokens per row (an upper
    bound: batches are padded only to their longest row); None when the settings cannot be estimated."""
    cfg = run.config
    try:
        q, lo, t = cfg["quant"], cfg["lora"], cfg["train"]
        dtype = auto_dtype if q["compute_dtype"] == "auto" else q["compute_dtype"]
        if dtype is None:
            return None
        est = estimate_memory(
            ModelShape.from_config(cfg["model"]["name"]),
            method="qlora" if q["enabled"] else "lora",
            batch=int(t["batch_size"]),
            seq=int(cfg["data"]["max_length"]),
            r=int(lo["r"]),
            targets=lo["target_modules"],
            grad_checkpointing=bool(t["gradient_checkpointing"]),
            compute_dtype=dtype,
            optimizer=CONFIG_OPTIMIZERS[t["optim"]],
            blocksize=int(q["blocksize"]),
            double_quant=bool(q["double_quant"]),
            lora_dropout=float(lo["dropout"]),
        )
    except (KeyError, TypeError, ValueError, QLoraKitError):
        return None
    return est.peak


def table_rows(
    lora: RunResult, qlora: RunResult, auto_dtype: str | None = None
) -> list[tuple[str, str, str]]:
    """(metric, 16-bit LoRA, QLoRA) rows of the report table."""

    def row(name: str, fmt: Any) -> tuple[str, str, str]:
        return name, fmt(lora), fmt(qlora)

    return [
        row("Base weights", lambda r: r.summary.quantization),
        row("Compute dtype", lambda r: r.compute_dtype(auto_dtype)),
        row("Peak memory (RSS, whole process)", lambda r: f"{r.peak_rss_mib:,.0f} MiB"),
        row("Estimated peak (qlorakit estimate, at max_length)", lambda r: _estimate(r, auto_dtype)),
        row("Step time (median)", lambda r: f"{r.median_step_time_s:.3f} s"),
        row("Step time (mean)", lambda r: f"{r.mean_step_time_s:.3f} s"),
        row("Throughput", lambda r: f"{r.tokens_per_s:,.1f} tokens/s"),
        row("Steps", lambda r: str(r.summary.steps)),
        row("Final train loss", lambda r: _loss(r.summary.final_train_loss)),
        row(
            "Validation loss before → after",
            lambda r: f"{_loss(r.summary.val_loss_before)} → {_loss(r.final_val_loss)}",
        ),
        row("Best validation loss", lambda r: _loss(r.summary.best_val_loss)),
        row("Held-out exact match before → after", lambda r: _exact(r.summary)),
        row("Adapter size on disk", lambda r: format_bytes(r.adapter_bytes)),
        row("Wall time (load, train, evaluate)", lambda r: f"{r.summary.wall_time_s:.1f} s"),
    ]


def conclusion(lora: RunResult, qlora: RunResult) -> str:
    """One computed sentence: memory saved, step-time ratio and the loss difference."""
    saving = 1.0 - qlora.peak_rss_mib / max(lora.peak_rss_mib, 1e-9)
    memory = f"{abs(saving) * 100:.0f}% {'less' if saving >= 0 else 'more'} peak memory"
    memory += f" ({qlora.peak_rss_mib:,.0f} vs {lora.peak_rss_mib:,.0f} MiB)"
    ratio = qlora.median_step_time_s / max(lora.median_step_time_s, 1e-9)
    text = f"QLoRA used {memory} than 16-bit LoRA at {ratio:.2f}× the step time"
    if qlora.final_val_loss is not None and lora.final_val_loss is not None:
        diff, kind = qlora.final_val_loss - lora.final_val_loss, "validation"
        a, b = qlora.final_val_loss, lora.final_val_loss
    else:
        a, b = qlora.summary.final_train_loss, lora.summary.final_train_loss
        diff, kind = (None if a is None or b is None else a - b), "train"
    if diff is None:
        return text + "."
    return f"{text}; final {kind} loss differs by {diff:+.4f} ({a:.4f} vs {b:.4f})."


def build_report(
    lora: RunResult, qlora: RunResult, commands: dict[str, str] | None = None, auto_dtype: str | None = None
) -> str:
    """The Markdown report (pure: no file is read or written). `commands`: label -> the command that ran;
    `auto_dtype`: what `quant.compute_dtype: auto` resolved to on the machine that trained."""
    s = lora.summary
    header = [
        "# 16-bit LoRA vs QLoRA",
        "",
        f"Base model `{s.base_model}`, LoRA r={s.lora_r} alpha={s.lora_alpha}; "
        "the same data, seed and number of steps for both runs, each in its own process (so each peak "
        "memory is that run's alone).",
        "",
        f"**{conclusion(lora, qlora)}**",
        "",
        "| Metric | 16-bit LoRA | QLoRA |",
        "| --- | ---: | ---: |",
    ]
    body = [f"| {name} | {a} | {b} |" for name, a, b in table_rows(lora, qlora, auto_dtype)]
    notes = [
        "",
        "Peak memory is the process's peak resident set size (loading, training and evaluation). Step time "
        "counts forward, backward and optimizer work; throughput is input tokens per second of training "
        "time. Exact match compares greedy generations on held-out rows with their reference answers. "
        "Without quantization the base weights are kept in the compute dtype (16 bits with bfloat16 or "
        "float16 compute, 32 bits with float32).",
    ]
    differences = setting_differences(lora, qlora)
    if differences:
        notes += ["", "**Warning: the runs differ in more than quantization:**", ""]
        notes += [f"- {d}" for d in differences]
    plots = ["", "## Plots", "", f"![Loss curves]({PLOTS['loss']})", "", f"![Peak memory]({PLOTS['memory']})"]
    plots += ["", f"![Speed]({PLOTS['speed']})"]
    runs = ["", "## Runs", ""]
    for run in (lora, qlora):
        runs.append(f"- {run.label}: `{run.folder}`")
        if commands and run.label in commands:
            runs.append(f"  - command: `{commands[run.label]}`")
    return "\n".join(header + body + notes + plots + runs) + "\n"


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
    """Train (lines) and validation (markers) loss of every run against the step, one axes; PNG bytes."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, run in enumerate(runs):
        color = f"C{i}"
        for split, style in (("train", "-"), ("val", "o--")):
            rows = [r for r in run.records if r.get("split") == split and r.get("loss") is not None]
            if rows:
                ax.plot(
                    [r["step"] for r in rows],
                    [r["loss"] for r in rows],
                    style,
                    color=color,
                    label=f"{run.label} {split}",
                )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / label token)")
    ax.grid(alpha=0.3)
    ax.legend()
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


def plot_peak_memory(runs: Sequence[RunResult]) -> bytes:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    _bars(ax, runs, [r.peak_rss_mib for r in runs], "peak RSS (MiB)", ",.0f")
    ax.set_title("Peak memory")
    return _png(fig)


def plot_speed(runs: Sequence[RunResult]) -> bytes:
    """Median step time and training throughput side by side; PNG bytes."""
    plt = require_matplotlib()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4), dpi=100)
    _bars(left, runs, [r.median_step_time_s for r in runs], "seconds per step (median)", ".3f")
    left.set_title("Step time")
    _bars(right, runs, [r.tokens_per_s for r in runs], "tokens / s", ",.1f")
    right.set_title("Throughput")
    fig.tight_layout()
    return _png(fig)


def write_report(
    out: str | Path,
    lora_dir: str | Path,
    qlora_dir: str | Path,
    commands: dict[str, str] | None = None,
    auto_dtype: str | None = None,
) -> Path:
    """Read both run folders and write `report.md` and the three PNG plots into `out`; returns the report.

    `commands` and `auto_dtype` go into the report (see `build_report`)."""
    out = Path(out)
    lora, qlora = read_run(lora_dir, "16-bit LoRA"), read_run(qlora_dir, "QLoRA")
    runs = (lora, qlora)
    images = {"loss": plot_loss_curves(runs), "memory": plot_peak_memory(runs), "speed": plot_speed(runs)}
    for key, data in images.items():
        atomic_write_bytes(out / PLOTS[key], data)
    return atomic_write_text(out / REPORT, build_report(lora, qlora, commands, auto_dtype))
