"""A finished `qlorakit train` output folder as `qlorakit compare` reads it.

The folder holds what the training pipeline writes: `summary.json` (the typed `RunSummary`: peak RSS,
throughput, losses, held-out generations, parameter counts, the size of the saved weights),
`metrics.jsonl` (one record per logged step, `split` train or val) and the resolved `config.yaml`.
`read_run` turns it into a `RunResult`; nothing here writes.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlorakit.core.errors import CheckpointError
from qlorakit.lora.peft_format import WEIGHTS_NAME
from qlorakit.train.metrics import JSONL, read_records
from qlorakit.train.report import SUMMARY, RunSummary, read_summary


@dataclass(frozen=True)
class RunResult:
    """One finished training run, as its output folder describes it."""

    label: str
    folder: Path
    summary: RunSummary
    records: list[dict[str, Any]]
    adapter_bytes: int
    """The trained weights on disk: the adapter, or the whole model for full fine-tuning."""
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

    @property
    def on_4bit_base(self) -> bool:
        """Whether the frozen base was quantized (the resolved config says; else the summary's text)."""
        quant = self.config.get("quant", {})
        if isinstance(quant, dict) and "enabled" in quant:
            return bool(quant["enabled"])
        return not self.summary.quantization.startswith("16-bit")

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


def _weights_bytes(folder: Path, summary: RunSummary, label: str) -> int:
    """The saved weights' size: the summary's record, else (a run from before it was recorded) the
    adapter file's size."""
    if summary.output_bytes is not None:
        return summary.output_bytes
    adapter = folder / WEIGHTS_NAME
    if not adapter.is_file():
        raise CheckpointError(f"{adapter} is missing: the {label} run saved no adapter")
    return adapter.stat().st_size


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
    weights = _weights_bytes(folder, summary, label)
    config: dict[str, Any] = {}
    if (folder / "config.yaml").is_file():
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CheckpointError(f"cannot read {folder / 'config.yaml'}: {exc}") from exc
    records = read_records(folder / JSONL)
    return RunResult(label, folder, summary, records, weights, config)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as {"section.key": value}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


__all__ = ["RunResult", "flatten", "median_step_time", "read_run"]
