"""Generating text from a base model with zero, one or several LoRA adapters.

Prompts are rendered exactly as in training (`qlorakit.data.prompt_ids`: the tokenizer's chat template
when it has one, else the Alpaca template), decoding is Hugging Face `generate` (greedy unless a
temperature is given), and streaming goes through a `TextStreamer` whose finished text pieces are handed
to a callback as they come.

`AdapterServer` keeps one base model in memory (4-bit by default) with every adapter loaded under its own
name, and switches adapter per request: nothing is reloaded between requests.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlorakit.config import QuantConfig
from qlorakit.errors import ConfigError, ModelError

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


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids: list[int] = []
    config_eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    for value in (tokenizer.eos_token_id, config_eos):
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
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


def render_prompt(prompt: str | Sequence[Any], tokenizer: Any, template: str = "auto") -> list[int]:
    """Token ids of a prompt as training renders it: a user instruction (str) or a list of `Message`s."""
    from qlorakit.data import Message, prompt_ids

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


# ---------------------------------------------------------------------------------------------------------
# Adapters by name


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, Path]:
    """`["NAME=DIR", "DIR"]` -> {name: folder}; a bare folder is named after itself."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        name = name.strip()
        if not name or "." in name:
            raise ConfigError(
                f"adapter {spec!r}: its name {name!r} must be non-empty without '.'; use NAME=DIR to name it"
            )
        if name in adapters:
            raise ConfigError(f"adapter name {name!r} is given twice; use NAME=DIR to tell them apart")
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(
                f"adapter {spec!r}: {folder / 'adapter_config.json'} not found (not an adapter folder)"
            )
        adapters[name] = folder
    return adapters


def is_four_bit(model: nn.Module) -> bool:
    """True when any layer of `model` holds 4-bit weights."""
    from qlorakit.quant.linear import Linear4bit

    return any(isinstance(m, Linear4bit) for m in model.modules())


def resolve_compute_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """`quant.compute_dtype` as a torch dtype; `auto` is what `device` computes natively (as in training)."""
    from qlorakit.quant.linear import default_compute_dtype

    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    return default_compute_dtype(device) if name == "auto" else table[name]


def adapter_quant_config(adapter_dir: str | Path) -> QuantConfig | None:
    """The `quant` section of the `config.yaml` that `qlorakit train` saves beside an adapter, if any.

    It says exactly how the 4-bit base the adapter was trained against was built (quant type, block
    size, double quantization, compute dtype, skipped layers).
    """
    from qlorakit.config import load_config

    path = Path(adapter_dir) / "config.yaml"
    return load_config(path).quant if path.is_file() else None


def load_base(
    spec: str | Path, *, four_bit: bool = True, quant: QuantConfig | None = None
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) in eval mode, built as training builds it.

    The weights load in the compute dtype (`quant.compute_dtype`; fp32 on CPUs without native bf16) and,
    with `four_bit`, are quantized layer by layer as they are read. A folder already stored in 4 bits is
    used as it is.
    """
    from qlorakit.models import load_model

    quant = quant or QuantConfig()
    compute_dtype = resolve_compute_dtype(quant.compute_dtype)
    # With four_bit, each layer is quantized as it is read (a folder already in 4 bits is used as stored).
    model, tokenizer = load_model(spec, dtype=compute_dtype, quantize=quant if four_bit else None)
    model.eval()
    return model, tokenizer


def _shared_quant_config(adapters: Mapping[str, str | Path]) -> QuantConfig | None:
    """The first adapter's saved quant settings; a warning when the adapters were trained on different bases."""
    configs = {name: adapter_quant_config(path) for name, path in adapters.items()}
    first = next(iter(configs.values()))
    differing = [name for name, cfg in configs.items() if cfg is not None and cfg != first]
    if differing:
        warnings.warn(
            f"adapters {differing} were trained against a 4-bit base built with other settings than "
            f"{next(iter(configs))!r}; they share one base here, so their outputs can differ from training",
            UserWarning,
            stacklevel=3,
        )
    return first


class AdapterServer:
    """One base model, many named adapters, switched per request without reloading anything.

    `base` is a model spec (HF folder, .gguf, built-in name) or an already loaded model (then `tokenizer`
    is required). `adapters` maps a name to a PEFT adapter folder. The 4-bit base is built with `quant`,
    by default the settings saved with the first adapter by `qlorakit train` (else NF4, blocksize 64,
    double quantization). Requests are serialised by a lock: the active adapter is state of the model.
    """

    def __init__(
        self,
        base: str | Path | nn.Module,
        adapters: Mapping[str, str | Path] | None = None,
        *,
        tokenizer: Any | None = None,
        four_bit: bool = True,
        quant: QuantConfig | None = None,
        template: str = "auto",
    ) -> None:
        if isinstance(base, nn.Module):
            if tokenizer is None:
                raise ConfigError("AdapterServer: pass tokenizer= together with an already loaded model")
            self.model, self.tokenizer = base.eval(), tokenizer
        else:
            if quant is None and adapters:
                quant = _shared_quant_config(adapters)
            self.model, self.tokenizer = load_base(base, four_bit=four_bit, quant=quant)
        self.template = template
        self.adapters: dict[str, Path] = {}
        self._lock = threading.Lock()
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT adapter folder under `name` on the shared base."""
        from qlorakit.lora.peft_format import load_adapter

        if name in self.adapters:
            raise ConfigError(f"an adapter named {name!r} is already loaded (from {self.adapters[name]})")
        with self._lock:
            load_adapter(self.model, Path(path), adapter_name=name)
            self.model.eval()
        self.adapters[name] = Path(path)

    @contextlib.contextmanager
    def using(self, adapter: str | None) -> Iterator[nn.Module]:
        """The model with `adapter` active (None: the plain base), under the request lock."""
        from qlorakit.lora.inject import disable_adapters, set_active_adapter

        if adapter is not None and adapter not in self.adapters:
            known = ", ".join(self.adapters) or "none loaded"
            raise ModelError(f"no adapter named {adapter!r} (loaded: {known})")
        with self._lock:
            if adapter is None:
                if self.adapters:
                    with disable_adapters(self.model):
                        yield self.model
                else:
                    yield self.model
            else:
                set_active_adapter(self.model, adapter)
                yield self.model

    def generate(
        self,
        prompt: str | Sequence[Any],
        adapter: str | None = None,
        settings: GenerationSettings = GenerationSettings(),
        *,
        on_text: TextCallback | None = None,
    ) -> str:
        """The completion of `prompt` (an instruction, or a list of chat `Message`s) with `adapter`."""
        with self.using(adapter) as model:
            return generate_text(
                model, self.tokenizer, prompt, settings, template=self.template, on_text=on_text
            )
