"""The comparison report of fine-tuning methods, built from finished `qlorakit train` output folders.

`read_run` (tools/run_folder.py) reads each run folder; `build_report` turns the runs into Markdown (a pure
function: a table with a row per method, a table with a column per method, computed sentences) and
`write_report` adds the plots (tools/compare_plots.py) and writes everything atomically. Nothing here
trains: `qlorakit compare` (tools/compare_runs.py) runs the trainings, then calls `write_report`.

The first run is the reference of the sentences (each other run's memory, step time and loss against
it). Quantization drift is measured for every run on a 4-bit base: the validation loss of its base before
training minus that of a 16-bit base from the same comparison (the base alone: training evaluates the
"before" loss with the method switched off), and, when the comparison holds the same run on a 16-bit
base (QLoRA and 16-bit LoRA), the difference of their final validation losses.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from qlorakit.core.atomic import atomic_write_bytes, atomic_write_text
from qlorakit.core.dtypes import format_bytes
from qlorakit.core.errors import DependencyError, QLoraKitError
from qlorakit.eval.metrics import rouge_l
from qlorakit.models.shape import ModelShape
from qlorakit.tools.compare_methods import COMPARE_METHODS, DEFAULT_METHODS, CompareMethod
from qlorakit.tools.compare_plots import (
    plot_loss_curves,
    plot_memory_vs_quality,
    plot_peak_memory,
    plot_speed,
)
from qlorakit.tools.estimate.memory import CONFIG_OPTIMIZERS, estimate_memory
from qlorakit.tools.run_folder import RunResult, flatten, median_step_time, read_run
from qlorakit.train.report import RunSummary

REPORT = "report.md"
PLOTS = {
    "loss": "loss_curves.png",
    "memory": "peak_memory.png",
    "speed": "speed.png",
    "tradeoff": "memory_vs_quality.png",
}
# Keys of the resolved config that may differ between the default pair (16-bit LoRA, QLoRA).
_EXPECTED_DIFFERENCES = ("quant.enabled", "output.dir")
# (config method, 4-bit base) -> `qlorakit estimate`'s method; other methods and DoRA it does not model
_ESTIMATED = {("full", False): "full", ("lora", False): "lora", ("lora", True): "qlora"}


def setting_differences(
    a: RunResult, b: RunResult, expected: Collection[str] = _EXPECTED_DIFFERENCES
) -> list[str]:
    """Resolved-config keys that differ between the runs besides the `expected` ones."""
    fa, fb = flatten(a.config), flatten(b.config)
    if not fa or not fb:
        return []
    keys = sorted((set(fa) | set(fb)) - set(expected))
    return [f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in keys if fa.get(k) != fb.get(k)]


def estimated_peak(run: RunResult, auto_dtype: str | None) -> int | None:
    """`qlorakit estimate`'s peak RSS for the run's settings at `data.max_length` tokens per row (an upper
    bound: batches are padded only to their longest row); None when the settings cannot be estimated."""
    cfg = run.config
    try:
        q, lo, t = cfg["quant"], cfg["lora"], cfg["train"]
        method = None if lo.get("use_dora") else _ESTIMATED.get((cfg.get("method", "lora"), q["enabled"]))
        dtype = auto_dtype if q["compute_dtype"] == "auto" else q["compute_dtype"]
        if dtype is None or method is None:
            return None
        est = estimate_memory(
            ModelShape.from_config(cfg["model"]["name"]),
            method=method,
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
    except (KeyError, TypeError, ValueError, AttributeError, QLoraKitError):
        return None
    return est.peak


@dataclass(frozen=True)
class Drift:
    """What quantizing the base cost one run, in validation loss (nats / label token; + means worse)."""

    base: float | None
    """Its 4-bit base minus the 16-bit base of `reference`, before training; None without such a run."""
    reference: str | None
    trained: float | None
    """Its final loss minus that of `twin`, the same run on a 16-bit base; None without such a run."""
    twin: str | None


def quantization_drift(run: RunResult, runs: Sequence[RunResult]) -> Drift | None:
    """The drift of `run` against the 16-bit runs among `runs`; None when `run` has a 16-bit base."""
    if not run.on_4bit_base:
        return None
    plain = [r for r in runs if not r.on_4bit_base]
    reference = next((r for r in plain if r.summary.val_loss_before is not None), None)
    base = None
    if reference is not None and run.summary.val_loss_before is not None:
        base = run.summary.val_loss_before - reference.summary.val_loss_before
    twin = next(
        (
            r
            for r in plain
            if r.config and run.config and r.final_val_loss is not None and not setting_differences(run, r)
        ),
        None,
    )
    trained = None
    if twin is not None and run.final_val_loss is not None:
        trained = run.final_val_loss - twin.final_val_loss
    return Drift(
        base, None if base is None else reference.label, trained, None if twin is None else twin.label
    )


def rouge_before_after(summary: RunSummary) -> tuple[float, float] | None:
    """Mean ROUGE-L F1 of the held-out generations before and after training against their references;
    None without generations. DependencyError when rouge-score is not installed."""
    gens = summary.generations
    if not gens:
        return None
    refs = [g.reference for g in gens]
    return rouge_l([g.before for g in gens], refs), rouge_l([g.after for g in gens], refs)


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _exact(s: RunSummary) -> str:
    n = s.samples
    return f"{s.exact_before}/{n} → {s.exact_after}/{n}"


def _estimate(run: RunResult, auto_dtype: str | None) -> str:
    peak = estimated_peak(run, auto_dtype)
    return "n/a" if peak is None else f"{peak / 2**20:,.0f} MiB"


def _method_text(run: RunResult) -> str:
    """The run's method as its resolved config sets it (LoRA with its rank, alpha and variant)."""
    method, lo = run.config.get("method", "lora"), run.config.get("lora", {})
    if method != "lora":
        return str(method)
    text = f"LoRA r={lo.get('r', run.summary.lora_r)} alpha={lo.get('alpha', run.summary.lora_alpha):g}"
    return text + (", DoRA" if lo.get("use_dora") else "")


def _rouge(run: RunResult) -> str:
    try:
        scores = rouge_before_after(run.summary)
    except DependencyError:
        return "n/a (pip install rouge-score)"
    return "n/a" if scores is None else f"{scores[0]:.3f} → {scores[1]:.3f}"


def _drift(run: RunResult, runs: Sequence[RunResult]) -> str:
    drift = quantization_drift(run, runs)
    if drift is None:
        return "– (16-bit base)"
    if drift.base is None:
        return "n/a (no 16-bit run to compare with)"
    text = f"{drift.base:+.4f} (base)"
    if drift.trained is not None:
        text += f", {drift.trained:+.4f} trained (vs {drift.twin})"
    return text


def _params(s: RunSummary) -> str:
    return "n/a" if s.trainable_params is None else f"{s.trainable_params:,d}"


def _percent(s: RunSummary) -> str:
    share = s.trainable_percent
    return "n/a" if share is None else f"{share:.4f}%"


Column = Callable[[RunResult, Sequence[RunResult]], str]
# The table with one row per method: (header, cell of one run given all runs)
METHOD_COLUMNS: tuple[tuple[str, Column], ...] = (
    ("Trainable params", lambda r, _: _params(r.summary)),
    ("Trainable %", lambda r, _: _percent(r.summary)),
    ("Saved weights", lambda r, _: format_bytes(r.adapter_bytes)),
    ("Peak memory (VmHWM)", lambda r, _: f"{r.peak_rss_mib:,.0f} MiB"),
    ("s / step (median)", lambda r, _: f"{r.median_step_time_s:.3f}"),
    ("Tokens / s", lambda r, _: f"{r.tokens_per_s:,.1f}"),
    (
        "Val loss before → after",
        lambda r, _: f"{_loss(r.summary.val_loss_before)} → {_loss(r.final_val_loss)}",
    ),
    ("Exact match before → after", lambda r, _: _exact(r.summary)),
    ("ROUGE-L before → after", lambda r, _: _rouge(r)),
    ("Quantization drift (val loss)", _drift),
)


def method_table(runs: Sequence[RunResult]) -> list[str]:
    """The Markdown table with one row per run (`METHOD_COLUMNS`)."""
    head = ["| Method | " + " | ".join(h for h, _ in METHOD_COLUMNS) + " |"]
    head.append("| --- |" + " ---: |" * len(METHOD_COLUMNS))
    return head + [f"| {r.label} | " + " | ".join(c(r, runs) for _, c in METHOD_COLUMNS) + " |" for r in runs]


def table_rows(runs: Sequence[RunResult], auto_dtype: str | None = None) -> list[tuple[str, ...]]:
    """(metric, one cell per run) rows of the table with a column per run."""

    def row(name: str, fmt: Callable[[RunResult], str]) -> tuple[str, ...]:
        return (name, *(fmt(r) for r in runs))

    return [
        row("Method", _method_text),
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


def conclusion(reference: RunResult, run: RunResult) -> str:
    """One computed sentence: `run`'s memory saved, step-time ratio and loss difference against `reference`."""
    saving = 1.0 - run.peak_rss_mib / max(reference.peak_rss_mib, 1e-9)
    memory = f"{abs(saving) * 100:.0f}% {'less' if saving >= 0 else 'more'} peak memory"
    memory += f" ({run.peak_rss_mib:,.0f} vs {reference.peak_rss_mib:,.0f} MiB)"
    ratio = run.median_step_time_s / max(reference.median_step_time_s, 1e-9)
    text = f"{run.label} used {memory} than {reference.label} at {ratio:.2f}× the step time"
    if run.final_val_loss is not None and reference.final_val_loss is not None:
        a, b, kind = run.final_val_loss, reference.final_val_loss, "validation"
    else:
        a, b, kind = run.summary.final_train_loss, reference.summary.final_train_loss, "train"
    if a is None or b is None:
        return text + "."
    return f"{text}; final {kind} loss differs by {a - b:+.4f} ({a:.4f} vs {b:.4f})."


def conclusions(runs: Sequence[RunResult]) -> list[str]:
    """`conclusion` of every run after the first against the first."""
    return [conclusion(runs[0], run) for run in runs[1:]]


def _notes(runs: Sequence[RunResult], expected: Collection[str]) -> list[str]:
    notes = [
        "",
        "Peak memory is the process's peak resident set size (VmHWM: loading, training and evaluation). "
        "Step time counts forward, backward and optimizer work; throughput is input tokens per second of "
        "training time. Trainable % is of all the model's parameters (a 4-bit weight counts 2 per byte); "
        "saved weights are the `.safetensors` files the method wrote (the whole model for full "
        "fine-tuning). Exact match and ROUGE-L compare greedy generations on held-out rows with their "
        "reference answers. Quantization drift: the validation loss of the 4-bit base minus that of the "
        "16-bit base before training, and where the same run exists on a 16-bit base, the difference of "
        "their final validation losses. Without quantization the base weights are kept in the compute "
        "dtype (16 bits with bfloat16 or float16 compute, 32 bits with float32).",
    ]
    differences = [f"{r.label}: {d}" for r in runs[1:] for d in setting_differences(runs[0], r, expected)]
    if differences:
        notes += ["", "**Warning: the runs differ in more than the method settings:**", ""]
        notes += [f"- {d}" for d in differences]
    return notes


def build_report(
    *runs: RunResult,
    commands: dict[str, str] | None = None,
    auto_dtype: str | None = None,
    expected: Collection[str] = _EXPECTED_DIFFERENCES,
) -> str:
    """The Markdown report of `runs` (pure: no file is read or written). `commands`: label -> the command
    that ran; `auto_dtype`: what `quant.compute_dtype: auto` resolved to on the machine that trained;
    `expected`: the config keys the runs are meant to differ in (the others are reported as a warning)."""
    header = [
        f"# {' vs '.join(r.label for r in runs)}",
        "",
        f"Base model `{runs[0].summary.base_model}`; the same data, seed and number of steps for every run, "
        "each in its own process (so each peak memory is that run's alone).",
        "",
        *(f"**{sentence}**\n" for sentence in conclusions(runs)),
        *method_table(runs),
        "",
        "## Details",
        "",
        "| Metric | " + " | ".join(r.label for r in runs) + " |",
        "| --- |" + " ---: |" * len(runs),
    ]
    body = ["| " + " | ".join(cells) + " |" for cells in table_rows(runs, auto_dtype)]
    plots = ["", "## Plots", ""]
    for key, title in (("loss", "Loss curves"), ("tradeoff", "Memory vs quality")):
        plots += [f"![{title}]({PLOTS[key]})", ""]
    plots += [f"![Peak memory]({PLOTS['memory']})", "", f"![Speed]({PLOTS['speed']})"]
    lines = ["", "## Runs", ""]
    for run in runs:
        lines.append(f"- {run.label}: `{run.folder}`")
        if commands and run.label in commands:
            lines.append(f"  - command: `{commands[run.label]}`")
    return "\n".join(header + body + _notes(runs, expected) + plots + lines) + "\n"


def read_runs(folders: Sequence[str | Path], methods: Sequence[CompareMethod]) -> list[RunResult]:
    """The run folders, labelled by their methods (in the same order)."""
    if len(folders) != len(methods):
        raise ValueError(f"{len(folders)} run folders for {len(methods)} methods")
    return [read_run(folder, m.label) for folder, m in zip(folders, methods, strict=True)]


def write_report(
    out: str | Path,
    *folders: str | Path,
    methods: Sequence[CompareMethod] | None = None,
    commands: dict[str, str] | None = None,
    auto_dtype: str | None = None,
) -> Path:
    """Read the run folders of `methods` (default: 16-bit LoRA, QLoRA), one per method in order, and write
    `report.md` and the PNG plots into `out`; returns the report.

    `commands` and `auto_dtype` go into the report (see `build_report`)."""
    out = Path(out)
    methods = methods if methods is not None else [COMPARE_METHODS[n] for n in DEFAULT_METHODS]
    runs = read_runs(folders, methods)
    expected = {"output.dir", *(key for m in methods for key in m.keys)}
    images: dict[str, Callable[[Sequence[RunResult]], bytes]] = {
        "loss": plot_loss_curves,
        "memory": plot_peak_memory,
        "speed": plot_speed,
        "tradeoff": plot_memory_vs_quality,
    }
    for key, plot in images.items():
        atomic_write_bytes(out / PLOTS[key], plot(runs))
    report = build_report(*runs, commands=commands, auto_dtype=auto_dtype, expected=expected)
    return atomic_write_text(out / REPORT, report)


__all__ = [
    "PLOTS",
    "REPORT",
    "Drift",
    "RunResult",
    "build_report",
    "conclusion",
    "conclusions",
    "estimated_peak",
    "median_step_time",
    "quantization_drift",
    "read_run",
    "read_runs",
    "rouge_before_after",
    "setting_differences",
    "table_rows",
    "write_report",
]
