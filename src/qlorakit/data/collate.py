"""Examples -> padded batches, and sample packing.

Causal-LM losses (Hugging Face's included) shift by one: label[i] is predicted from the logits at i-1.
In a packed row the first token of a segment would therefore be predicted from the previous segment's last
token, so its label is forced to -100; `position_ids` restart at 0 per segment and attention is restricted
to each segment by a 4-D block-diagonal causal mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qlorakit.core.errors import DataError
from qlorakit.data.render import IGNORE_INDEX, Example


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] position ids (restarting at 0 per segment) -> [B, T] segment index (0, 0, 1, 1, 1, 2, ...)."""
    starts = torch.zeros_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] == 0
    return starts.long().cumsum(-1)


def block_causal_mask(segments: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T] segment index -> [B, 1, T, T] additive mask: 0 where query i may attend key j (same segment,
    j <= i), the dtype's lowest value elsewhere. Additive masks work with the eager and SDPA attention of
    Hugging Face models, which use a 4-D mask as given."""
    t = segments.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch.

    Returns `input_ids` [B, T] long (pad_id on padding), `labels` [B, T] long (-100 on padding) and
    `attention_mask`: [B, T] long (1 = token, 0 = padding) for plain rows; when any row is packed, also
    `position_ids` [B, T] and a [B, 1, T, T] float block-diagonal causal mask (padding forms its own
    segment, which no real token can see)."""
    if not examples:
        raise DataError("collate: an empty batch; the dataset produced no examples")
    t = max(len(e.input_ids) for e in examples)
    b = len(examples)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    lengths = torch.tensor([len(e.input_ids) for e in examples])
    packed = any(e.position_ids is not None for e in examples)
    positions = torch.zeros((b, t), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        if len(ex.labels) != n:
            raise DataError(f"{ex.source}: input_ids and labels differ in length ({n} vs {len(ex.labels)})")
        input_ids[i, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(ex.labels, dtype=torch.long)
        positions[i, :n] = torch.tensor(ex.position_ids) if ex.position_ids is not None else torch.arange(n)
        positions[i, n:] = torch.arange(t - n)  # padding: one more segment starting at 0
    batch = {"input_ids": input_ids, "labels": labels}
    if not packed:
        batch["attention_mask"] = (torch.arange(t)[None, :] < lengths[:, None]).long()
        return batch
    segments = segment_ids(positions)
    batch["position_ids"] = positions
    batch["attention_mask"] = block_causal_mask(segments)
    return batch


def _join(row: list[Example]) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in row:
        ids += ex.input_ids
        labels += [IGNORE_INDEX, *ex.labels[1:]]  # nothing predicts a segment's first token
        positions += range(len(ex.input_ids))
    return Example(ids, labels, ",".join(ex.source for ex in row), positions)


def pack_examples(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Greedy packing in the given order: append each example to the current row while it fits in
    `max_length` tokens, else start a new row. Each row carries `position_ids` restarting per segment; the
    first label of every segment is -100 so no label crosses a boundary."""
    rows: list[Example] = []
    current: list[Example] = []
    used = 0
    for ex in examples:
        n = len(ex.input_ids)
        if n > max_length:
            raise DataError(
                f"{ex.source}: {n} tokens do not fit a packed row of {max_length}; truncate first"
            )
        if ex.position_ids is not None:
            raise DataError(f"{ex.source}: this example is already packed")
        if current and used + n > max_length:
            rows.append(_join(current))
            current, used = [], 0
        current.append(ex)
        used += n
    if current:
        rows.append(_join(current))
    return rows
