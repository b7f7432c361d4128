"""Perplexity of a causal LM on text, over sliding windows.

Each text is tokenized on its own and cut into windows of at most `max_length` tokens that start
every `stride` tokens. Every token t >= 1 is scored exactly once, by the first window that covers it
with at least one token of context before it, so with `stride < max_length` later windows re-read the
previous tokens as context (the standard "sliding window" evaluation) and score only their new ones.
The loss is the token-weighted mean negative log-likelihood over all scored tokens of all texts;
perplexity is exp(loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from torch import nn

from qlorakit.core.errors import ConfigError, DataError
from qlorakit.data import IGNORE_INDEX
from qlorakit.loss import token_loss_sum


@dataclass(frozen=True)
class PerplexityResult:
    """loss: mean NLL per scored token (nats); perplexity: exp(loss); tokens: how many were scored."""

    loss: float
    perplexity: float
    tokens: int


@dataclass(frozen=True)
class Window:
    """Tokens [start, end) of one text go into the model; tokens [score_from, end) are scored."""

    text_index: int
    start: int
    end: int
    score_from: int


def builtin_eval_text() -> str:
    """The small English text shipped with qlorakit for quick perplexity checks."""
    return resources.files("qlorakit").joinpath("resources/eval_text.txt").read_text(encoding="utf-8")


def plan_windows(lengths: list[int], max_length: int, stride: int) -> list[Window]:
    """The windows covering texts of the given token lengths (pure; see module doc).

    A window that would score nothing (its tokens are all scored already) is left out.
    """
    windows: list[Window] = []
    for index, length in enumerate(lengths):
        scored_until = 1  # token 0 has no context: it is never scored
        start = 0
        while scored_until < length and start + 1 < length:  # a window needs a token after its first
            end = min(start + max_length, length)
            score_from = max(scored_until, start + 1)
            if score_from < end:
                windows.append(Window(index, start, end, score_from))
                scored_until = end
            start += stride
    return windows


def window_nll(logits: torch.Tensor, ids: torch.Tensor, score_from: int) -> tuple[torch.Tensor, int]:
    """Sum of NLL of `ids[score_from:]` given logits of one window.

    logits: [T, vocab] for window tokens `ids` [T]; position p's logits predict token p+1.
    Returns (fp32 scalar sum, number of scored tokens).
    """
    labels = ids.clone()
    labels[:score_from] = IGNORE_INDEX  # the context: seen, not scored
    return token_loss_sum(logits[None], labels[None]), ids.numel() - score_from


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [list(ids) for ids in encoded]


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | list[str],
    *,
    max_length: int = 256,
    stride: int | None = None,
    batch_size: int = 1,
) -> PerplexityResult:
    """Token-weighted perplexity of `model` on `text` (one string or a list of documents).

    stride: tokens between window starts (default: `max_length`, i.e. windows do not overlap).
    Windows of a batch are right-padded; causal attention keeps padding from touching real tokens.
    """
    texts = [text] if isinstance(text, str) else list(text)
    stride = max_length if stride is None else stride
    if max_length < 2:
        raise ConfigError(f"perplexity max_length={max_length} must be >= 2 (one context token + one target)")
    if not 1 <= stride <= max_length:
        raise ConfigError(f"perplexity stride={stride} must be between 1 and max_length={max_length}")
    if batch_size < 1:
        raise ConfigError(f"perplexity batch_size={batch_size} must be >= 1")
    token_ids = _tokenize(tokenizer, texts)
    windows = plan_windows([len(ids) for ids in token_ids], max_length, stride)
    if not windows:
        raise DataError("perplexity: the text has fewer than 2 tokens, so there is nothing to score")

    device = _model_device(model)
    pad_id = 0
    total_nll = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for first in range(0, len(windows), batch_size):
                batch = windows[first : first + batch_size]
                width = max(w.end - w.start for w in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, w in enumerate(batch):
                    ids[row, : w.end - w.start] = torch.tensor(token_ids[w.text_index][w.start : w.end])
                    mask[row, : w.end - w.start] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for row, w in enumerate(batch):
                    length = w.end - w.start
                    nll, count = window_nll(
                        logits[row, :length], ids[row, :length].to(device), w.score_from - w.start
                    )
                    total_nll += nll.double().cpu()
                    total_tokens += count
    finally:
        model.train(was_training)

    loss = float(total_nll / total_tokens)
    ppl = math.exp(loss) if loss < 700 else math.inf
    return PerplexityResult(loss=loss, perplexity=ppl, tokens=total_tokens)
