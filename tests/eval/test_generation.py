"""Generation helpers on a real tiny Llama: greedy and sampled decoding, streaming, prompt rendering."""

from __future__ import annotations

import pytest
import torch

from qlorakit.core.errors import ConfigError
from qlorakit.eval.generation import GenerationSettings, generate_ids, generate_text, render_prompt

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest
PROMPT = "What is 2 + 3?"


def manual_greedy(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Reference decoding: full forward each step, argmax of the last position, stop at EOS."""
    out: list[int] = []
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
            if nxt == eos:
                break
    return out


def test_greedy_matches_manual_argmax_loop(tiny_llama, tiny_tokenizer):
    ids = render_prompt(PROMPT, tiny_tokenizer)
    got = generate_ids(tiny_llama, tiny_tokenizer, ids, GenerationSettings(max_new_tokens=12))
    assert got == manual_greedy(tiny_llama, ids, 12, tiny_tokenizer.eos_token_id)


def test_stops_at_eos(tiny_llama, tiny_tokenizer):
    """Bias the head towards EOS after a few tokens: generation ends with EOS, before max_new_tokens."""
    ids = render_prompt(PROMPT, tiny_tokenizer)
    with torch.no_grad():
        tiny_llama.lm_head.weight[tiny_tokenizer.eos_token_id] *= 0
        tiny_llama.lm_head.bias = None
        tiny_llama.lm_head.weight[tiny_tokenizer.eos_token_id] += tiny_llama.model.norm.weight * 5
    got = generate_ids(tiny_llama, tiny_tokenizer, ids, GenerationSettings(max_new_tokens=50))
    assert got[-1] == tiny_tokenizer.eos_token_id and len(got) < 50
    assert got == manual_greedy(tiny_llama, ids, 50, tiny_tokenizer.eos_token_id)


def test_sampling_is_seeded_and_leaves_global_rng(tiny_llama, tiny_tokenizer):
    ids = render_prompt(PROMPT, tiny_tokenizer)
    s1 = GenerationSettings(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=7)
    s2 = GenerationSettings(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=8)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = generate_ids(tiny_llama, tiny_tokenizer, ids, s1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert generate_ids(tiny_llama, tiny_tokenizer, ids, s1) == a
    assert generate_ids(tiny_llama, tiny_tokenizer, ids, s2) != a
    assert a != generate_ids(tiny_llama, tiny_tokenizer, ids, GenerationSettings(max_new_tokens=16))


def test_streaming_pieces_add_up_to_the_completion(tiny_llama, tiny_tokenizer):
    pieces: list[str] = []
    text = generate_text(
        tiny_llama, tiny_tokenizer, PROMPT, GenerationSettings(max_new_tokens=20), on_text=pieces.append
    )
    assert len(pieces) > 1 and "".join(pieces) == text


def test_prompt_rendering_is_the_training_one(tiny_tokenizer):
    from qlorakit.data import Message, prompt_ids

    ids = render_prompt(PROMPT, tiny_tokenizer)
    assert ids == prompt_ids(PROMPT, tiny_tokenizer, "auto")
    text = tiny_tokenizer.decode(ids)
    assert "<|im_start|>user\nWhat is 2 + 3?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    chat = [Message("user", "hi"), Message("assistant", "hello"), Message("user", PROMPT)]
    assert render_prompt(chat, tiny_tokenizer) == prompt_ids(tuple(chat), tiny_tokenizer, "auto")
    alpaca = tiny_tokenizer.decode(render_prompt(PROMPT, tiny_tokenizer, "alpaca"))
    assert alpaca.rstrip().endswith("### Response:")
    with pytest.raises(ConfigError, match="empty"):
        render_prompt("  ", tiny_tokenizer)


def test_settings_validation():
    with pytest.raises(ConfigError, match="temperature"):
        GenerationSettings(temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        GenerationSettings(top_p=0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
