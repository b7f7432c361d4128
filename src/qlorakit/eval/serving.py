"""`AdapterServer`: one base model in memory (4-bit by default) with every adapter loaded under its own
name, switching adapter per request: nothing is reloaded between requests.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from qlorakit.config import QuantConfig
from qlorakit.core.errors import ConfigError, ModelError
from qlorakit.eval.generation import GenerationSettings, TextCallback, generate_text
from qlorakit.methods import Method, base_only, load_adapter
from qlorakit.models.load import load_base, shared_quant_config

_DEFAULT_SETTINGS = GenerationSettings()


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
                quant = shared_quant_config(adapters)
            self.model, self.tokenizer = load_base(base, four_bit=four_bit, quant=quant)
        self.template = template
        self.adapters: dict[str, Path] = {}
        self.methods: dict[str, Method] = {}
        self._lock = threading.Lock()
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT adapter folder under `name` on the shared base."""
        if name in self.adapters:
            raise ConfigError(f"an adapter named {name!r} is already loaded (from {self.adapters[name]})")
        with self._lock:
            self.methods[name] = load_adapter(self.model, Path(path), adapter_name=name)
            self.model.eval()
        self.adapters[name] = Path(path)

    @contextlib.contextmanager
    def using(self, adapter: str | None) -> Iterator[nn.Module]:
        """The model with `adapter` active (None: the plain base), under the request lock."""
        if adapter is not None and adapter not in self.adapters:
            known = ", ".join(self.adapters) or "none loaded"
            raise ModelError(f"no adapter named {adapter!r} (loaded: {known})")
        with self._lock:
            if adapter is None:
                if self.adapters:
                    with base_only(self.model):
                        yield self.model
                else:
                    yield self.model
            else:
                self.methods[adapter].activate(self.model, adapter)
                yield self.model

    def generate(
        self,
        prompt: str | Sequence[Any],
        adapter: str | None = None,
        settings: GenerationSettings = _DEFAULT_SETTINGS,
        *,
        on_text: TextCallback | None = None,
    ) -> str:
        """The completion of `prompt` (an instruction, or a list of chat `Message`s) with `adapter`."""
        with self.using(adapter) as model:
            return generate_text(
                model, self.tokenizer, prompt, settings, template=self.template, on_text=on_text
            )
