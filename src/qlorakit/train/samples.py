"""Held-out checks around training: the validation loss and greedy answers on held-out rows.

`qlorakit train` runs them once with the adapters disabled (the base model) and once after training; the
run summary compares the two (`qlorakit.train.report`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from qlorakit.config import Config
from qlorakit.data import DataBundle, Example, Record, prompt_ids, reference_answer
from qlorakit.models.decode import generate_greedy_batch
from qlorakit.train.distributed import DistContext, barrier
from qlorakit.train.loop import Batch, evaluate_loss

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: Held-out prompts decoded together: one pass over the 4-bit weights per token serves this many rows.
SAMPLE_BATCH = 8


@dataclass(frozen=True)
class HeldOutCheck:
    """The validation loss (None without validation rows) and the greedy answers on held-out rows."""

    loss: float | None
    texts: list[str]


@dataclass(frozen=True)
class EvalSettings:
    """How the validation loss is measured (the training config's batch size and limits)."""

    batch_size: int
    max_batches: int | None
    autocast_dtype: torch.dtype | None


def held_out_records(records: list[Record], n: int) -> list[Record]:
    """The first `n` validation records that have a reference answer."""
    return [r for r in records if reference_answer(r) is not None][:n]


def generate_samples(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[Record], template: str
) -> list[str]:
    """Greedy completions of each held-out record's prompt (budget: reference length + 8 tokens)."""
    prompts = [prompt_ids(r, tokenizer, template) for r in records]
    budgets = [
        len(tokenizer(reference_answer(r), add_special_tokens=False)["input_ids"]) + 8 for r in records
    ]
    out = []
    for k in range(0, len(records), SAMPLE_BATCH):
        rows = generate_greedy_batch(
            model, tokenizer, prompts[k : k + SAMPLE_BATCH], budgets[k : k + SAMPLE_BATCH]
        )
        out += [tokenizer.decode(new, skip_special_tokens=True).strip() for new in rows]
    return out


def check_held_out(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: DataBundle,
    cfg: Config,
    ctx: DistContext,
    collate_fn: Callable[[Sequence[Example]], Batch],
    settings: EvalSettings,
) -> HeldOutCheck:
    """Validation loss (all ranks) and greedy generations on held-out rows (rank 0)."""
    loss = evaluate_loss(
        model,
        data.val,
        collate_fn,
        batch_size=settings.batch_size,
        max_batches=settings.max_batches,
        ctx=ctx,
        autocast_dtype=settings.autocast_dtype,
    )
    texts: list[str] = []
    if ctx.is_main:
        with torch.random.fork_rng(devices=[]):  # generation must not move the training RNG streams
            texts = generate_samples(
                model, tokenizer, held_out_records(data.val_records, cfg.output.samples), cfg.data.template
            )
    barrier(ctx)
    return HeldOutCheck(loss, texts)


__all__ = [
    "SAMPLE_BATCH",
    "EvalSettings",
    "HeldOutCheck",
    "check_held_out",
    "generate_samples",
    "held_out_records",
]
