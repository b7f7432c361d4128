"""Training metrics: progress bar, `metrics.jsonl` + `metrics.csv`, TensorBoard, loss-curve PNG.

Every record is one JSON line (`split` is `train` or `val`); the CSV holds the same rows with fixed
columns. On resume, rows of steps after the checkpoint (redone by the resumed run) are dropped first.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from qlorakit.core.atomic import atomic_write_bytes, atomic_write_text
from qlorakit.core.memory import peak_rss_bytes

JSONL = "metrics.jsonl"
CSV = "metrics.csv"
PLOT = "loss_curve.png"
CSV_COLUMNS = ("step", "split", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s")


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics JSONL file; a torn last line (killed writer) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _csv_text(records: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow(rec)
    return buf.getvalue()


class ThroughputWindow:
    """Loss and tokens/s averaged over the steps since the last metrics record."""

    def __init__(self) -> None:
        self.loss, self.steps, self.tokens, self.seconds = 0.0, 0, 0, 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def record(
        self, step: int, tokens: int, elapsed_s: float, epoch: float, lr: float, grad_norm: float
    ) -> dict[str, Any]:
        """The `train` metrics row (`tokens`, `elapsed_s`: totals of the run so far); resets the window."""
        row = {
            "step": step, "split": "train", "epoch": epoch, "loss": self.loss / max(1, self.steps),
            "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": self.tokens_per_s,
            "elapsed_s": elapsed_s,
        }  # fmt: skip
        self.__init__()
        return row


class MetricsWriter:
    """Appends metric records to JSONL, CSV and (when installed and wanted) TensorBoard.

    Inactive (writes nothing) on ranks other than 0.
    """

    def __init__(self, out_dir: Path, *, active: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.active = active
        self.jsonl = out_dir / JSONL
        self.csv = out_dir / CSV
        self._tb = None
        if not active:
            return
        kept = [r for r in read_records(self.jsonl) if resume_step is not None and r["step"] <= resume_step]
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        atomic_write_text(self.csv, _csv_text(kept))
        if tensorboard:
            self._tb = _open_tensorboard(out_dir / "tensorboard")

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with open(self.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        with open(self.csv, "a", encoding="utf-8", newline="") as fh:
            csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n").writerow(
                record
            )
        if self._tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                if record.get(key) is not None:
                    self._tb.add_scalar(f"{record['split']}/{key}", record[key], record["step"])

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.jsonl)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _open_tensorboard(log_dir: Path) -> Any:
    """A SummaryWriter, or None (with a one-line note) when `tensorboard` is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(
            "note: tensorboard is not installed; metrics go to metrics.jsonl/metrics.csv only",
            file=sys.stderr,
        )
        return None
    return SummaryWriter(log_dir=str(log_dir))


def progress_bar(total: int, initial: int, active: bool) -> Any:
    """A tqdm bar over optimizer steps (ETA from tqdm; loss, lr and tokens/s go in the postfix)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=not active, desc="train", unit="step", dynamic_ncols=True
    )


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Train and validation loss against step as a PNG; None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no loss-curve plot", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for split, style in (("train", "-"), ("val", "o-")):
        rows = [r for r in records if r["split"] == split and r.get("loss") is not None]
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], style, label=f"{split} loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / label token)")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (see qlorakit.core.memory.peak_rss_bytes)."""
    return peak_rss_bytes() / 2**20
