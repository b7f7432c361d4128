"""Batched greedy generation (the held-out samples of a training summary) equals one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny import make_tiny_llama, make_tiny_tokenizer
from qlorakit.core.errors import ConfigError
from qlorakit.eval.generation import GenerationSettings, generate_ids, render_prompt
from qlorakit.models.decode import generate_greedy_batch

PROMPTS = [
    "What is 2 + 3?",
    "Reverse the word hello",
    "Hi",
    "The quick brown fox jumps over the lazy dog. Why?",
]


def test_batched_rows_equal_unbatched_greedy_runs_with_their_own_budgets():
    # fp32 model: the claim is token-exact, so the dtype is pinned (padding changes matmul shapes, which in
    # bf16 could flip a near-tie).
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), seed=3, dtype=torch.float32)
    prompts = [render_prompt(p, tokenizer) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths exercise the left padding"
    budgets = [5, 12, 1, 8]
    batched = generate_greedy_batch(model, tokenizer, prompts, budgets)
    for ids, budget, got in zip(prompts, budgets, batched, strict=True):
        assert got == generate_ids(model, tokenizer, ids, GenerationSettings(budget))
        assert 1 <= len(got) <= budget
    # A random tiny model rarely emits EOS: force one to check rows stop at their first EOS.
    eos = tokenizer.eos_token_id

    def favour_eos(module, args, logits):
        logits[..., eos] += 1e4

    model.lm_head.register_forward_hook(favour_eos)
    for row in generate_greedy_batch(model, tokenizer, prompts, budgets):
        assert row == [eos]


def test_mismatched_or_empty_prompts_are_named_errors():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    with pytest.raises(ConfigError, match="one non-empty prompt per budget"):
        generate_greedy_batch(model, tokenizer, [[1, 2]], [3, 4])
    with pytest.raises(ConfigError, match="one non-empty prompt per budget"):
        generate_greedy_batch(model, tokenizer, [[]], [3])
