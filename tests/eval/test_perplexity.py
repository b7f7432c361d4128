"""Perplexity over sliding windows, checked against a hand computation on a tiny real Llama."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers.tiny import make_tiny_llama
from qlorakit.core.errors import ConfigError, DataError
from qlorakit.eval.perplexity import builtin_eval_text, perplexity, plan_windows

TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello, how are you? I am fine, thank you. "
    "What is 2 + 3? It is 5. Reverse the word hello: olleh."
)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return make_tiny_llama(vocab_size=len(tiny_tokenizer), seed=3)


def hand_nll(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """Direct definition: token t >= 1 is scored by the first window [s, s+L) with s < t < s+L."""
    total, count = 0.0, 0
    starts = list(range(0, len(ids), stride))
    for t in range(1, len(ids)):
        s = next((s for s in starts if s < t < s + max_length), None)
        if s is None:  # the first token of a disjoint window has no context
            continue
        window = torch.tensor([ids[s:t]])  # context s..t-1; its last logits predict t
        with torch.no_grad():
            logits = model(input_ids=window).logits[0, -1]
        total += float(-F.log_softmax(logits.double(), dim=-1)[ids[t]])
        count += 1
    return total, count


def test_full_context_equals_cross_entropy(model, tiny_tokenizer):
    ids = tiny_tokenizer(TEXT)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0]
    expected = F.cross_entropy(logits[:-1], x[0, 1:]).item()
    result = perplexity(model, tiny_tokenizer, TEXT, max_length=len(ids) + 5)
    assert result.tokens == len(ids) - 1
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


@pytest.mark.parametrize(("max_length", "stride"), [(8, 8), (8, 3), (16, 5), (5, 1)])
def test_sliding_windows_match_hand_computation(model, tiny_tokenizer, max_length, stride):
    ids = tiny_tokenizer(TEXT)["input_ids"]
    total, count = hand_nll(model, ids, max_length, stride)
    result = perplexity(model, tiny_tokenizer, TEXT, max_length=max_length, stride=stride)
    # With disjoint windows the first token of every window has no context and is not scored.
    assert result.tokens == count
    assert result.loss == pytest.approx(total / count, rel=1e-4)


def test_list_of_texts_is_token_weighted_and_batching_is_exact(model, tiny_tokenizer):
    texts = [TEXT, "Hello, how are you?", TEXT[:60]]
    parts = [perplexity(model, tiny_tokenizer, t, max_length=12, stride=6) for t in texts]
    together = perplexity(model, tiny_tokenizer, texts, max_length=12, stride=6)
    batched = perplexity(model, tiny_tokenizer, texts, max_length=12, stride=6, batch_size=4)
    assert together.tokens == sum(p.tokens for p in parts)
    weighted = sum(p.loss * p.tokens for p in parts) / together.tokens
    assert together.loss == pytest.approx(weighted, rel=1e-6)
    assert batched.tokens == together.tokens
    assert batched.loss == pytest.approx(together.loss, rel=1e-5)


def test_plan_windows_scores_every_token_once():
    for length in [1, 2, 7, 30]:
        for max_length, stride in [(4, 4), (4, 1), (6, 4), (2, 2)]:
            windows = plan_windows([length], max_length, stride)
            scored = [t for w in windows for t in range(w.score_from, w.end)]
            expected = [
                t for t in range(1, length) if any(s < t < s + max_length for s in range(0, length, stride))
            ]
            assert scored == expected
            assert all(w.end - w.start <= max_length and w.start < w.score_from for w in windows)


def test_restores_training_mode_and_rejects_bad_arguments(model, tiny_tokenizer):
    model.train()
    perplexity(model, tiny_tokenizer, TEXT, max_length=16)
    assert model.training
    model.eval()
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, tiny_tokenizer, TEXT, max_length=8, stride=9)
    with pytest.raises(ConfigError, match="max_length"):
        perplexity(model, tiny_tokenizer, TEXT, max_length=1)
    with pytest.raises(DataError, match="fewer than 2 tokens"):
        perplexity(model, tiny_tokenizer, "", max_length=8)


def test_builtin_text_is_english_and_a_few_kilobytes():
    text = builtin_eval_text()
    assert 2000 <= len(text.encode()) <= 4096
    assert "lighthouse" in text
