"""Generating text from a base model with zero, one or several LoRA adapters.

Prompts are rendered exactly as in training (`qlorakit.data.prompt_ids`: the tokenizer's chat template
when it has one, else the Alpaca template), decoding is Hugging Face `generate` (greedy unless a
temperature is given), and streaming goes through a `TextStreamer` whose finished text pieces are handed
to a callback as they come.

Batched greedy decoding, the EOS and pad ids and the context budget live in `qlorakit.models.decode`
(training's held-out samples use them too); serving several adapters on one base in `qlorakit.eval.serving`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qlorakit.core.errors import ConfigError
from qlorakit.data import Message, prompt_ids
from qlorakit.models.decode import eos_token_ids, pad_token_id, token_budget

TextCallback = Callable[[str], None]


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0 decodes greedily; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (sampling only)."""
    seed: int | None = None
    """Seed for sampling; the global RNG is left untouched."""

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _streamer(tokenizer: Any, on_text: TextCallback) -> Any:
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        """Hands each finished piece of text (whole words, decoded) to `on_text` as it is produced."""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the RNGs used by sampling inside the block only (the caller's RNG state is restored)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    tokenizer: Any,
    input_ids: Sequence[int],
    settings: GenerationSettings = GenerationSettings(),
    *,
    on_text: TextCallback | None = None,
) -> list[int]:
    """The new token ids (prompt excluded, up to and including EOS) for one prompt of token ids."""
    if not input_ids:
        raise ConfigError("cannot generate from an empty prompt")
    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    eos = eos_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, eos)
    kwargs: dict[str, Any] = {
        "max_new_tokens": token_budget(model, ids.shape[1], settings.max_new_tokens),
        "eos_token_id": eos or None,
        "pad_token_id": pad,
        "do_sample": not settings.greedy,
    }
    if settings.greedy:  # neutralise sampling knobs a checkpoint's generation_config may set
        kwargs.update(temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    if on_text is not None:
        kwargs["streamer"] = _streamer(tokenizer, on_text)
    with _seeded(settings.seed, device):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out[0, ids.shape[1] :].tolist()


def render_prompt(prompt: str | Sequence[Any], tokenizer: Any, template: str = "auto") -> list[int]:
    """Token ids of a prompt as training renders it: a user instruction (str) or a list of `Message`s."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ConfigError("the prompt is empty; pass some text with --prompt")
        return prompt_ids(prompt, tokenizer, template)
    messages = tuple(prompt)
    if not messages or not all(isinstance(m, Message) for m in messages):
        raise ConfigError("a chat prompt must be a non-empty sequence of qlorakit.data.Message")
    return prompt_ids(messages, tokenizer, template)


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[Any],
    settings: GenerationSettings = GenerationSettings(),
    *,
    template: str = "auto",
    on_text: TextCallback | None = None,
) -> str:
    """Render `prompt`, generate, and decode the completion (special tokens removed)."""
    ids = render_prompt(prompt, tokenizer, template)
    new = generate_ids(model, tokenizer, ids, settings, on_text=on_text)
    return tokenizer.decode(new, skip_special_tokens=True)
