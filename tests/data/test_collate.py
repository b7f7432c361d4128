"""Batching and sample packing, checked against a real tiny Llama's loss."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny import make_tiny_llama
from qlorakit.core.errors import DataError
from qlorakit.data import IGNORE_INDEX, Example, block_causal_mask, collate, pack_examples, render_record
from qlorakit.data.collate import segment_ids
from qlorakit.data.formats import Message, Record

ROWS = [
    ("Reverse the word.\n\nhello", "olleh"),
    ("What is 2 + 3?", "It is 5."),
    ("Say hello.", "Hello, how are you?"),
    ("Count to three.", "1, 2, 3"),
    ("Repeat: fox", "fox fox fox"),
]


def examples(tok, train_on_prompt: bool = False) -> list[Example]:
    out = []
    for i, (q, a) in enumerate(ROWS):
        rec = Record((Message("user", q), Message("assistant", a)), None, f"t:{i + 1}")
        out.append(render_record(rec, tok, template="chat", max_length=512, train_on_prompt=train_on_prompt))
    return out


def test_collate_pads_right_and_masks_padding_by_length(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = tok.eos_token  # pad == eos: the EOS labels must survive collation
    exs = examples(tok)[:3]
    batch = collate(exs, tok.pad_token_id)
    lengths = [len(e.input_ids) for e in exs]
    b, t = batch["input_ids"].shape
    assert (b, t) == (3, max(lengths)) and set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for i, ex in enumerate(exs):
        n = lengths[i]
        assert batch["input_ids"][i, :n].tolist() == ex.input_ids
        assert batch["labels"][i, :n].tolist() == ex.labels
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (t - n)
        assert tok.eos_token_id in batch["labels"][i, :n].tolist()
    with pytest.raises(DataError, match="empty batch"):
        collate([], 0)


def test_pack_examples_respects_length_and_boundaries(tiny_tokenizer):
    exs = examples(tiny_tokenizer, train_on_prompt=True)
    lengths = [len(e.input_ids) for e in exs]
    max_length = max(lengths) + min(lengths) + 1
    rows = pack_examples(exs, max_length)
    assert len(rows) < len(exs)
    assert all(len(r.input_ids) <= max_length for r in rows)
    assert [t for r in rows for t in r.input_ids] == [t for e in exs for t in e.input_ids]
    flat_positions = [p for r in rows for p in r.position_ids]
    assert flat_positions == [p for n in lengths for p in range(n)]
    flat_labels = [label for r in rows for label in r.labels]
    start = 0
    for e in exs:
        # the first token of every segment is never a target; the rest is unchanged
        assert flat_labels[start] == IGNORE_INDEX
        assert flat_labels[start + 1 : start + len(e.labels)] == e.labels[1:]
        start += len(e.labels)
    with pytest.raises(DataError, match="do not fit a packed row"):
        pack_examples(exs, min(lengths) - 1)
    with pytest.raises(DataError, match="already packed"):
        pack_examples(rows, 10_000)


def test_block_causal_mask_structure():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    seg = segment_ids(positions)
    assert seg.tolist() == [[0, 0, 0, 1, 1, 2]]
    mask = block_causal_mask(seg)
    assert mask.shape == (1, 1, 6, 6)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert mask.min() == torch.finfo(torch.float32).min


def _token_losses_sum(model, batch) -> tuple[float, int]:
    out = model(**batch, use_cache=False)
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    valid = labels != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum")
    return nll.item(), int(valid.sum())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_per_sequence_losses(tiny_tokenizer, attn):
    torch.manual_seed(0)
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    model.set_attn_implementation(attn)
    exs = examples(tiny_tokenizer, train_on_prompt=True)
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        separate = [_token_losses_sum(model, collate([e], pad)) for e in exs]
        ref_sum, ref_count = sum(s for s, _ in separate), sum(c for _, c in separate)
        rows = pack_examples(exs, 10_000)  # one row holding every example
        assert len(rows) == 1
        packed = collate(rows, pad)
        assert packed["attention_mask"].shape[-2:] == packed["input_ids"].shape[-1:] * 2
        got_sum, got_count = _token_losses_sum(model, packed)
        # Hugging Face's own shifted loss over the packed batch equals the per-sequence mean.
        hf_loss = model(**packed, use_cache=False).loss.item()
        # Without the block mask tokens see the previous segments: the loss changes.
        leaky = dict(packed, attention_mask=torch.ones_like(packed["input_ids"]))
        leaky_sum, _ = _token_losses_sum(model, leaky)
    assert got_count == ref_count  # the boundary tokens are excluded, every other target kept
    assert got_sum == pytest.approx(ref_sum, rel=1e-5)
    assert hf_loss == pytest.approx(ref_sum / ref_count, rel=1e-5)
    assert abs(leaky_sum - ref_sum) > 1e-3


def test_packed_and_plain_rows_batch_together(tiny_tokenizer):
    torch.manual_seed(0)
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    exs = examples(tiny_tokenizer)
    rows = pack_examples(exs[:3], 10_000)
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        batch = collate([rows[0], exs[3], exs[4]], pad)
        assert batch["attention_mask"].dim() == 4
        got, n = _token_losses_sum(model, batch)
        ref = [_token_losses_sum(model, collate([e], pad)) for e in exs]
    assert n == sum(c for _, c in ref)
    assert got == pytest.approx(sum(s for s, _ in ref), rel=1e-5)
