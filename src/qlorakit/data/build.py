"""The data pipeline: files -> validated records -> split -> rendered examples -> mixed (and packed) train set.

Order of operations, all deterministic for a given seed:
1. Each dataset is read and validated (`load_records`); `max_rows` keeps a seeded random subset of at most
   that many rows per dataset (file order preserved).
2. Validation rows: with `val_path`, that file (read with format auto) is the validation set; otherwise
   `round(val_ratio * rows)` rows of each dataset (at least one when val_ratio > 0 and the dataset has two
   rows or more) are held out by a seeded shuffle.
3. Every record is rendered once; rows longer than `max_length` are truncated or dropped and counted.
4. Mixing rule: dataset i contributes `weight_i * n_i` training examples, where n_i is its number of
   rendered training examples: `floor(weight_i)` full copies plus a seeded random subset for the fraction.
   Its share of the mix is therefore `weight_i * n_i / sum_j(weight_j * n_j)`; weight 1 everywhere is a plain
   concatenation. The mix is shuffled with the seed, then packed (`packing`) into rows of `max_length`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from qlorakit.config import DataConfig, DatasetSpec
from qlorakit.core.errors import DataError
from qlorakit.data.collate import pack_examples
from qlorakit.data.formats import BUILTIN, LoadResult, Record, load_records
from qlorakit.data.render import IGNORE_INDEX, Example, apply_length_policy, render_tokens, resolve_template


@dataclass
class DatasetStats:
    path: str
    format: str = "auto"
    weight: float = 1.0
    read: int = 0
    """Valid rows read (before `max_rows`)."""
    skipped: int = 0
    """Invalid rows skipped (`skip_invalid`)."""
    train_rows: int = 0
    val_rows: int = 0
    truncated: int = 0
    dropped: int = 0
    """Rows left out: longer than max_length under `drop`, or nothing left to train after truncation."""
    retokenized: int = 0
    """Rows whose tokenizer merged across a prompt/response boundary (labels from character offsets)."""
    mixed_rows: int = 0
    """Training examples this dataset contributes after weighting."""
    skipped_rows: tuple[str, ...] = ()
    """`file:line (problem)` of the first skipped rows."""
    longest: int = 0
    """Tokens of the longest rendered row (before truncation)."""


@dataclass
class DataStats:
    datasets: list[DatasetStats] = field(default_factory=list)
    template: str = ""
    train_examples: int = 0
    """Training rows fed to the model (packed rows when packing)."""
    val_examples: int = 0
    train_tokens: int = 0
    trained_tokens: int = 0
    """Training tokens with a label (responses and EOS)."""
    val_tokens: int = 0
    max_length: int = 0
    """Longest training row, in tokens."""
    mean_length: float = 0.0
    packed_from: int | None = None
    """Examples packed into the training rows (None without packing)."""

    def summary(self) -> str:
        head = f"{'dataset':<40} {'format':<8} {'weight':>6} {'read':>6} {'skipped':>7} {'train':>6} "
        head += f"{'val':>5} {'trunc':>6} {'dropped':>7} {'mixed':>6}"
        lines = [head]
        for d in self.datasets:
            name = d.path if len(d.path) <= 40 else "..." + d.path[-37:]
            lines.append(
                f"{name:<40} {d.format:<8} {d.weight:>6g} {d.read:>6} {d.skipped:>7} {d.train_rows:>6} "
                f"{d.val_rows:>5} {d.truncated:>6} {d.dropped:>7} {d.mixed_rows:>6}"
            )
        for d in self.datasets:
            if d.skipped:
                more = d.skipped - len(d.skipped_rows)
                shown = "; ".join(d.skipped_rows) + (f"; and {more} more" if more > 0 else "")
                lines.append(f"skipped {d.skipped} invalid row(s) of {d.path}: {shown}")
        packing = f" (packed from {self.packed_from} examples)" if self.packed_from is not None else ""
        lines.append(
            f"template {self.template}; train: {self.train_examples} rows{packing}, {self.train_tokens} tokens, "
            f"{self.trained_tokens} trained; length max {self.max_length}, mean {self.mean_length:.1f}; "
            f"val: {self.val_examples} rows, {self.val_tokens} tokens"
        )
        return "\n".join(lines)


@dataclass
class DataBundle:
    train: list[Example]
    val: list[Example]
    val_records: list[Record]
    """The records of `val`, in the same order (for generation metrics)."""
    stats: DataStats


def _rng(seed: int, *parts: object) -> random.Random:
    # Seeding with a string is stable across processes and Python versions (SHA-512 of the text).
    return random.Random("/".join(map(str, (seed, *parts))))


def _limit(records: list[Record], max_rows: int | None, seed: int, index: int) -> list[Record]:
    if max_rows is None or len(records) <= max_rows:
        return records
    keep = sorted(_rng(seed, "max_rows", index).sample(range(len(records)), max_rows))
    return [records[i] for i in keep]


def _split(
    records: list[Record], val_ratio: float, seed: int, index: int
) -> tuple[list[Record], list[Record]]:
    n = len(records)
    n_val = round(val_ratio * n)
    if val_ratio > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = list(range(n))
    _rng(seed, "split", index).shuffle(order)
    held = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in held], [
        r for i, r in enumerate(records) if i in held
    ]


def _load(spec: DatasetSpec, cfg: DataConfig, what: str) -> LoadResult:
    result = load_records(spec, skip_invalid=cfg.skip_invalid)
    if not result.records:
        why = f" ({result.skipped} invalid rows skipped)" if result.skipped else ""
        raise DataError(
            f"{result.path}: {what} has no usable rows{why}; check the file and data.datasets[].format"
        )
    return result


def check_datasets(cfg: DataConfig) -> None:
    """Validate every dataset file and row without a tokenizer (so a command fails before loading a model).
    Raises DataError on a missing file, a bad row (unless skip_invalid) or an empty dataset."""
    if not cfg.datasets:
        raise DataError("data.datasets: needs at least one dataset")
    for i, spec in enumerate(cfg.datasets):
        records = _load(spec, cfg, f"data.datasets[{i}]").records
        if cfg.val_path is None and len(_split(records, cfg.val_ratio, 0, i)[0]) == 0:
            raise DataError(f"{spec.path}: too few rows to hold out validation rows; lower data.val_ratio")
    if cfg.val_path is not None:
        _load(DatasetSpec(path=cfg.val_path), cfg, "data.val_path")


def _render_all(
    records: list[Record], tokenizer: Any, cfg: DataConfig, stats: DatasetStats | None
) -> list[tuple[Example, Record]]:
    out = []
    for record in records:
        example, info = render_tokens(
            record, tokenizer, template=cfg.template, train_on_prompt=cfg.train_on_prompt
        )
        kept = apply_length_policy(example, cfg.max_length, cfg.truncation)
        if stats is not None:
            stats.longest = max(stats.longest, info.length)
            stats.retokenized += info.retokenized
            stats.truncated += kept is not None and info.length > cfg.max_length
            stats.dropped += kept is None
        if kept is not None:
            out.append((kept, record))
    return out


def _weighted(examples: list[Example], weight: float, seed: int, index: int) -> list[Example]:
    copies = math.floor(weight)
    extra = round((weight - copies) * len(examples))
    picked = _rng(seed, "mix", index).sample(examples, extra) if extra else []
    return examples * copies + picked


def build_datasets(cfg: DataConfig, tokenizer: Any, *, seed: int) -> DataBundle:
    """Read, validate, split, render, mix and pack the configured datasets (see the module doc).

    Raises DataError for a missing file, a bad row, an empty dataset or an empty training set."""
    if not cfg.datasets:
        raise DataError("data.datasets: needs at least one dataset")
    stats = DataStats(template=resolve_template(cfg.template, tokenizer))
    mixed: list[Example] = []
    val_pairs: list[tuple[Example, Record]] = []
    for i, spec in enumerate(cfg.datasets):
        loaded = _load(spec, cfg, f"data.datasets[{i}]")
        name = BUILTIN if spec.path == BUILTIN else loaded.path
        ds = DatasetStats(name, loaded.format, spec.weight, len(loaded.records), loaded.skipped)
        ds.skipped_rows = loaded.skipped_rows
        stats.datasets.append(ds)
        records = _limit(loaded.records, cfg.max_rows, seed, i)
        train_recs, val_recs = (records, []) if cfg.val_path else _split(records, cfg.val_ratio, seed, i)
        if not train_recs:
            raise DataError(f"{spec.path}: too few rows to hold out validation rows; lower data.val_ratio")
        train = [ex for ex, _ in _render_all(train_recs, tokenizer, cfg, ds)]
        val_pairs += _render_all(val_recs, tokenizer, cfg, ds)
        ds.train_rows, ds.val_rows = len(train), len(val_recs)
        weighted = _weighted(train, spec.weight, seed, i)
        ds.mixed_rows = len(weighted)
        mixed += weighted
    if cfg.val_path is not None:
        loaded = _load(DatasetSpec(path=cfg.val_path), cfg, "data.val_path")
        val_stats = DatasetStats(
            f"{loaded.path} (val)", loaded.format, 0.0, len(loaded.records), loaded.skipped
        )
        val_stats.skipped_rows = loaded.skipped_rows
        stats.datasets.append(val_stats)
        val_pairs = _render_all(loaded.records, tokenizer, cfg, val_stats)
        val_stats.val_rows = len(val_pairs)
    if not mixed:
        raise _nothing_left(cfg, max(d.longest for d in stats.datasets))
    _rng(seed, "shuffle").shuffle(mixed)
    train = mixed
    if cfg.packing:
        stats.packed_from = len(mixed)
        train = pack_examples(mixed, cfg.max_length)
    _fill_totals(stats, train, [ex for ex, _ in val_pairs])
    return DataBundle(train, [ex for ex, _ in val_pairs], [rec for _, rec in val_pairs], stats)


def _nothing_left(cfg: DataConfig, longest: int) -> DataError:
    """Why every training row was dropped, with the fix that applies to the truncation policy in use."""
    if cfg.truncation == "drop":
        return DataError(
            f"no training examples are left: every row is longer than data.max_length={cfg.max_length} "
            f"tokens (the longest has {longest}) and data.truncation is drop; raise data.max_length or set "
            "data.truncation: truncate"
        )
    return DataError(
        f"no training examples are left: in every row the prompt alone fills data.max_length={cfg.max_length} "
        f"tokens (the longest row has {longest}), so truncation leaves no response token to train on; raise "
        "data.max_length or shorten the prompts"
    )


def _fill_totals(stats: DataStats, train: list[Example], val: list[Example]) -> None:
    lengths = [len(ex.input_ids) for ex in train]
    stats.train_examples = len(train)
    stats.val_examples = len(val)
    stats.train_tokens = sum(lengths)
    stats.trained_tokens = sum(sum(label != IGNORE_INDEX for label in ex.labels) for ex in train)
    stats.val_tokens = sum(len(ex.input_ids) for ex in val)
    stats.max_length = max(lengths)
    stats.mean_length = sum(lengths) / len(lengths)
