"""The typed run summary: what `qlorakit train` writes to `summary.json` and reads back to compare runs.

`RunSummary` is the one contract between the training pipeline (which builds it), the output folder's
README (`train.metrics.render_summary`), the console report and `qlorakit compare` (which reads finished
run folders). `to_json` / `from_json` keep the on-disk keys and their order exactly: one key per field, in
field order, `generations` as a list of {prompt, reference, before, after} objects.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorakit.core.atomic import atomic_write_json
from qlorakit.core.errors import CheckpointError

SUMMARY = "summary.json"


@dataclass(frozen=True)
class HeldOutGeneration:
    """One held-out row: its prompt, the reference answer and the greedy answers before/after training."""

    prompt: str
    reference: str
    before: str
    after: str


@dataclass(frozen=True)
class RunSummary:
    """One finished training run (the keys of summary.json, in this order)."""

    output_dir: str
    base_model: str
    quantization: str
    """e.g. `nf4 4-bit, blocksize 64, double quant True`, or `16-bit (no quantization)`."""
    lora_r: int
    lora_alpha: float
    trainable: str
    """The LoRA injection report (trainable parameters and wrapped layers)."""
    data_summary: str
    steps: int
    total_steps: int
    stop_reason: str
    epochs: float
    world_size: int
    final_train_loss: float | None
    val_loss_before: float | None
    val_loss_after: float | None
    best_val_loss: float | None
    best_step: int | None
    samples: int
    """Held-out rows generated before and after training."""
    exact_before: int
    exact_after: int
    generations: tuple[HeldOutGeneration, ...]
    wall_time_s: float
    train_time_s: float
    """Forward, backward and optimizer time (no loading, no evaluation)."""
    tokens_per_s: float
    peak_rss_mib: float
    loss_curve: str | None = None
    """The loss-curve PNG's file name when it was written."""
    trainable_params: int | None = None
    """Parameters the optimizer updated (None in summaries written before this field existed)."""
    total_params: int | None = None
    """All parameters of the model being trained, a 4-bit packed weight counting 2 per byte (as PEFT's
    `print_trainable_parameters` does), the method's own included."""
    output_bytes: int | None = None
    """Size on disk of the trained weights the run saved (the `.safetensors` files of the method's output:
    the adapter, or the whole model for full fine-tuning)."""

    @property
    def trainable_percent(self) -> float | None:
        """100 * trainable / total parameters; None when the counts were not recorded."""
        if self.trainable_params is None or not self.total_params:
            return None
        return 100.0 * self.trainable_params / self.total_params

    def to_json(self) -> dict[str, Any]:
        """The plain-data form written to summary.json (field order = key order)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = SUMMARY) -> RunSummary:
        """The summary `to_json` wrote; CheckpointError naming `source` and the missing keys otherwise."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{source} is not a JSON object; was it written by qlorakit train?")
        names = [f.name for f in dataclasses.fields(cls)]
        # fields with a default came later: a summary from an older qlorakit has none of them
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise CheckpointError(f"{source} has no {', '.join(missing)}; was it written by qlorakit train?")
        values = {n: data[n] for n in names if n in data}
        for f in dataclasses.fields(cls):  # JSON writes 2.0 as 2.0 but a hand-made file may hold 2
            if f.type in ("float", "float | None") and isinstance(values.get(f.name), int):
                values[f.name] = float(values[f.name])
        try:
            values["generations"] = tuple(HeldOutGeneration(**g) for g in data["generations"])
        except TypeError as exc:
            raise CheckpointError(
                f"{source}: generations are not prompt/reference/before/after objects"
            ) from exc
        return cls(**values)

    def write(self, folder: Path) -> Path:
        """`<folder>/summary.json`, atomically."""
        return atomic_write_json(folder / SUMMARY, self.to_json())


def read_summary(folder: Path) -> RunSummary:
    """The summary of a finished run folder; CheckpointError naming the file when it cannot be read."""
    path = folder / SUMMARY
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return RunSummary.from_json(data, str(path))


def same_answer(a: str, b: str) -> bool:
    """Exact match after collapsing whitespace and case."""
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def format_console(s: RunSummary) -> str:
    """The report `qlorakit train` prints at the end: losses and exact match before/after, generations."""

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        f"adapter saved in {s.output_dir} (adapter_config.json + adapter_model.safetensors, PEFT format)",
        f"steps {s.steps}/{s.total_steps} ({s.stop_reason}), wall time {s.wall_time_s:.1f} s, "
        f"{s.tokens_per_s:.0f} tokens/s, peak RSS {s.peak_rss_mib:.0f} MiB",
        f"{'':<28}{'before':>16}{'after':>16}",
        f"{'validation loss':<28}{f(s.val_loss_before):>16}{f(s.val_loss_after):>16}",
        f"{'exact match (held-out)':<28}{exact_match_text(s.exact_before, s.samples):>16}"
        f"{exact_match_text(s.exact_after, s.samples):>16}",
    ]
    for g in s.generations:
        lines += [
            f"- prompt: {g.prompt!r}",
            f"    reference: {g.reference!r}",
            f"    before:    {g.before!r}",
            f"    after:     {g.after!r}",
        ]
    return "\n".join(lines)


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def exact_match_text(hits: int, total: int) -> str:
    """`"9/24 (37.5%)"`: the count and the share, so a small sample cannot pass for a big effect."""
    share = 100.0 * hits / total if total else 0.0
    return f"{hits}/{total} ({share:.1f}%)"


def render_summary(s: RunSummary) -> str:
    """The output folder's README.md from the run summary."""
    lines = [
        f"# qlorakit run: {s.output_dir}",
        "",
        f"- Base model: `{s.base_model}` ({s.quantization})",
        f"- Adapter: LoRA r={s.lora_r}, alpha={s.lora_alpha}, {s.trainable}",
        f"- Data: {s.data_summary}",
        f"- Steps: {s.steps} of {s.total_steps} ({s.stop_reason}), epochs {_fmt(s.epochs, '.2f')}, "
        f"world size {s.world_size}",
        f"- Final train loss: {_fmt(s.final_train_loss)}; validation loss: "
        f"{_fmt(s.val_loss_before)} before -> {_fmt(s.val_loss_after)} after",
        f"- Exact match on {s.samples} held-out examples: {exact_match_text(s.exact_before, s.samples)} "
        f"before -> {exact_match_text(s.exact_after, s.samples)} after",
        f"- Wall time: {s.wall_time_s:.1f} s; training throughput {s.tokens_per_s:.1f} tokens/s; "
        f"peak RSS {s.peak_rss_mib:.0f} MiB",
        "",
        "Files: adapter (`adapter_config.json`, `adapter_model.safetensors`, PEFT format), tokenizer files, "
        "`config.yaml` (resolved configuration), `metrics.jsonl` / `metrics.csv`, "
        + (f"`{s.loss_curve}`, " if s.loss_curve else "")
        + "`checkpoints/`.",
        "",
        "## Held-out generations (greedy)",
    ]
    for g in s.generations:
        lines += [
            "",
            f"**Prompt:** {g.prompt!r}",
            f"- reference: {g.reference!r}",
            f"- before: {g.before!r}",
            f"- after: {g.after!r}",
        ]
    return "\n".join(lines) + "\n"


__all__ = [
    "SUMMARY",
    "HeldOutGeneration",
    "RunSummary",
    "exact_match_text",
    "format_console",
    "read_summary",
    "render_summary",
    "same_answer",
]
