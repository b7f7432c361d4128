"""Decoding primitives shared by training (held-out samples) and evaluation: which ids end a reply,
which id pads a batch, how many new tokens fit the context, and batched greedy generation.

They sit below `train` and `eval` so that training's sample generation does not reach into `eval`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qlorakit.core.errors import ConfigError


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids: list[int] = []
    config_eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    for value in (tokenizer.eos_token_id, config_eos):
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def pad_token_id(tokenizer: Any, eos: Sequence[int] = ()) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS, else the first of `eos` (e.g.
    `eos_token_ids`, which adds the model's generation-config EOS), else 0. Padded positions are masked
    out of attention and loss, so the choice only has to be a valid id."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if isinstance(tokenizer.eos_token_id, int):
        return tokenizer.eos_token_id
    return eos[0] if eos else 0


def token_budget(model: nn.Module, prompt_tokens: int, requested: int) -> int:
    """`requested` new tokens, capped (with a note on stderr) so prompt + answer fit the model's context."""
    context = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(context, int) or context <= 0:
        return requested
    room = context - prompt_tokens
    if room <= 0:
        raise ConfigError(
            f"the prompt has {prompt_tokens} tokens, which fills the model's whole context of {context} "
            "tokens; shorten it"
        )
    if requested > room:
        print(
            f"qlorakit: note: max_new_tokens {requested} goes past the model's context of {context} tokens; "
            f"generating at most {room} (the context minus the {prompt_tokens}-token prompt)",
            file=sys.stderr,
            flush=True,
        )
        return room
    return requested


@torch.no_grad()
def generate_greedy_batch(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], budgets: Sequence[int]
) -> list[list[int]]:
    """Greedy new token ids for several prompts in one `generate` call per `batch` rows (left-padded).

    Row i keeps at most `budgets[i]` new tokens, cut after its first EOS. Greedy decoding is causal, so a
    row's first `budgets[i]` tokens do not depend on the longer budget the batch runs for. One batched
    call decodes every row with each dequantization of the 4-bit weights instead of one row at a time
    (24 held-out samples: one pass over the weights per token instead of 24). Padding changes matmul
    shapes, so in bf16 a row can differ from its unbatched run by rounding.
    """
    if len(prompts) != len(budgets) or any(not p for p in prompts):
        raise ConfigError("generate_greedy_batch needs one non-empty prompt per budget")
    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, eos)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=token_budget(model, width, max(budgets)),
        eos_token_id=eos or None,
        pad_token_id=pad,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    rows = []
    for row, budget in zip(out[:, width:].tolist(), budgets, strict=True):
        row = row[:budget]
        ends = [k for k, t in enumerate(row) if t in eos]
        rows.append(row[: ends[0] + 1] if ends else row)
    return rows
