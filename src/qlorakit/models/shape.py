"""The shape of a decoder-only transformer, read without loading weights.

`ModelShape.from_config` accepts a config.json dict, a Hugging Face model folder or its config.json
(Llama, Mistral, Qwen2, Gemma and GPT-2 key names), a GGUF file (its metadata only), a qlorakit YAML
config (its `model.name`), or the built-in name `smollm2-135m`. The memory model in `qlorakit.tools.estimate.memory`
works from these sizes alone.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorakit.core.dtypes import FLOAT_DTYPE_NAMES, dtype_name
from qlorakit.core.errors import ConfigError, QLoraKitError
from qlorakit.models.resolve import BUILTIN_MODELS, DEFAULT_MODEL, builtin_model_path, gguf_conversion_cached
from qlorakit.quant.select import matches_suffix


@dataclass(frozen=True)
class LinearShape:
    """One linear layer of a decoder block: `name` is its module path inside the block."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory use of a decoder-only transformer."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int
    model_type: str = "llama"
    qkv_bias: bool = False
    norms_per_layer: int = 2
    layer_norm: bool = False  # LayerNorm (weight + bias) instead of RMSNorm (weight)
    learned_positions: int = 0  # rows of a learned position embedding (GPT-2)
    checkpoint_dtype: str = "float32"
    checkpoint_format: str = "safetensors"  # or "gguf"
    gguf_converted: bool = False  # a GGUF whose converted safetensors folder is already in qlorakit's cache
    max_positions: int = 0  # the context length the model was trained for (0: unknown)

    @classmethod
    def from_config(cls, source: str | Path | dict[str, Any]) -> ModelShape:
        """From a config.json dict, a model folder or config.json path, a .gguf file, a qlorakit YAML
        config (its `model.name`), or the built-in name `smollm2-135m`."""
        if isinstance(source, dict):
            return _shape_from_dict(source, "<dict>")
        return _shape_from_source(str(source))

    def layer_linears(self) -> list[LinearShape]:
        """The linear layers of one decoder block, with Hugging Face module names."""
        h, qd, kvd, i = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        if self.model_type == "gpt2":
            return [
                LinearShape("attn.c_attn", h, 3 * h, True),
                LinearShape("attn.c_proj", h, h, True),
                LinearShape("mlp.c_fc", h, i, True),
                LinearShape("mlp.c_proj", i, h, True),
            ]
        return [
            LinearShape("self_attn.q_proj", h, qd, self.qkv_bias),
            LinearShape("self_attn.k_proj", h, kvd, self.qkv_bias),
            LinearShape("self_attn.v_proj", h, kvd, self.qkv_bias),
            LinearShape("self_attn.o_proj", qd, h, False),
            LinearShape("mlp.gate_proj", h, i, False),
            LinearShape("mlp.up_proj", h, i, False),
            LinearShape("mlp.down_proj", i, h, False),
        ]

    @property
    def gated_mlp(self) -> bool:
        return self.model_type != "gpt2"

    def norm_params(self) -> int:
        """Parameters of all norms (per layer and final)."""
        per_norm = self.hidden_size * (2 if self.layer_norm else 1)
        return per_norm * (self.num_layers * self.norms_per_layer + 1)

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size + self.learned_positions * self.hidden_size

    def head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def linear_weight_params(self) -> int:
        return self.num_layers * sum(lin.numel for lin in self.layer_linears())

    def linear_bias_params(self) -> int:
        return self.num_layers * sum(lin.out_features for lin in self.layer_linears() if lin.bias)

    def num_params(self) -> int:
        return (
            self.embedding_params()
            + self.head_params()
            + self.norm_params()
            + self.linear_weight_params()
            + self.linear_bias_params()
        )

    def num_param_tensors(self) -> int:
        """Number of parameter tensors (AdamW keeps a 4-byte `step` per tensor)."""
        per_layer = len(self.layer_linears()) + sum(lin.bias for lin in self.layer_linears())
        per_layer += self.norms_per_layer * (2 if self.layer_norm else 1)
        final = 2 if self.layer_norm else 1
        return (
            1
            + (self.learned_positions > 0)
            + (not self.tie_word_embeddings)
            + final
            + self.num_layers * per_layer
        )


def target_linears(arch: ModelShape, targets: str | list[str] | tuple[str, ...]) -> list[LinearShape]:
    """The per-layer linears a LoRA target spec selects ("all-linear" = every block linear, not the head).

    A name matches a module whose path is the name or ends with "." + name, as in PEFT. A string that is
    not a plain name is a regular expression over module paths (`lora.target_modules` as PEFT reads it:
    a full match of e.g. `model.layers.0.self_attn.q_proj`); layer-specific patterns count for every layer.
    """
    linears = arch.layer_linears()
    if targets == "all-linear":
        return linears
    if isinstance(targets, str):
        prefix = "transformer.h.0." if arch.model_type == "gpt2" else "model.layers.0."
        try:
            matched = [lin for lin in linears if re.fullmatch(targets, prefix + lin.name)]
        except re.error as exc:
            raise ConfigError(f"LoRA targets {targets!r} is not a valid regular expression ({exc})") from exc
        if matched:
            return matched
    names = [targets] if isinstance(targets, str) else list(targets)
    chosen = [lin for lin in linears if matches_suffix(lin.name, names)]
    if not chosen:
        known = ", ".join(lin.name.split(".")[-1] for lin in linears)
        raise ConfigError(
            f"LoRA targets {names} match no linear layer of this {arch.model_type} model; known: {known}"
        )
    return chosen


_TIED_BY_DEFAULT = ("gpt2", "gemma", "gemma2", "gemma3_text")


def _shape_from_dict(cfg: dict[str, Any], where: str) -> ModelShape:
    """A `ModelShape` from config.json keys (Llama/Mistral/Qwen2/Gemma or GPT-2 spelling)."""

    def need(*keys: str) -> int:
        for key in keys:
            if cfg.get(key) is not None:
                return int(cfg[key])
        raise ConfigError(
            f"model config {where} has no {' / '.join(keys)}; is it a decoder-only config.json?"
        )

    model_type = str(cfg.get("model_type", "llama"))
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the decoder here
        return _shape_from_dict(cfg["text_config"], where)
    hidden = need("hidden_size", "n_embd", "d_model")
    layers = need("num_hidden_layers", "n_layer", "num_layers")
    heads = need("num_attention_heads", "n_head")
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if model_type == "gpt2":
        intermediate = int(cfg.get("n_inner") or 4 * hidden)
    else:
        intermediate = need("intermediate_size", "n_inner", "ffn_dim")
    tie = cfg.get("tie_word_embeddings")
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return ModelShape(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        vocab_size=need("vocab_size"),
        tie_word_embeddings=bool(model_type in _TIED_BY_DEFAULT if tie is None else tie),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        model_type=model_type,
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        norms_per_layer=4 if model_type in ("gemma2", "gemma3_text") else 2,
        layer_norm=model_type == "gpt2",
        learned_positions=int(cfg.get("n_positions") or 1024) if model_type == "gpt2" else 0,
        checkpoint_dtype=dtype_name(dtype) if dtype.lower() in FLOAT_DTYPE_NAMES else "float32",
        checkpoint_format=str(cfg.get("_checkpoint_format", "safetensors")),
        gguf_converted=bool(cfg.get("_gguf_converted", False)),
        max_positions=int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 0),
    )


def config_from_gguf(path: str | Path) -> dict[str, Any]:
    """A config.json-like dict from a GGUF file's metadata (tensor data is not read)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        field_ = reader.fields.get(key)
        if field_ is None:
            return None
        return field_.contents()

    arch = value("general.architecture")
    if arch is None:
        raise ConfigError(f"{path} has no general.architecture key; is it a GGUF model file?")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    tensor_names = {t.name for t in reader.tensors}
    cfg = {
        "model_type": arch,
        "hidden_size": value(f"{arch}.embedding_length"),
        "num_hidden_layers": value(f"{arch}.block_count"),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "num_attention_heads": value(f"{arch}.attention.head_count"),
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
        "vocab_size": value(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "max_position_embeddings": value(f"{arch}.context_length"),
        # transformers dequantizes GGUF tensors to float32 when it loads them
        "dtype": "float32",
        "_checkpoint_format": "gguf",
        "_gguf_converted": _conversion_cached(Path(path)),
    }
    return {k: v for k, v in cfg.items() if v is not None}


def _conversion_cached(path: Path) -> bool:
    """Whether `qlorakit.models.resolve.convert_gguf` already cached this file's converted folder (as the
    built-in model's name or the file's own stem)."""
    return any(gguf_conversion_cached(path, name) for name in (None, *BUILTIN_MODELS))


def _model_name_from_yaml(path: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    name = (data or {}).get("model", {}).get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path} has no model.name; set it to a model folder or {DEFAULT_MODEL}")
    return name


def model_source(name: str, config_file: str | Path) -> str:
    """The model a YAML config's `model.name` names: a built-in name as is; a relative path that does not
    exist from the working directory but does next to `config_file` is taken relative to that file."""
    if name.lower() in BUILTIN_MODELS:
        return name
    target = Path(name).expanduser()
    beside = Path(config_file).parent / target
    if not target.is_absolute() and not target.exists() and beside.exists():
        return str(beside)
    return str(target)


def _shape_from_source(source: str) -> ModelShape:
    if source.lower() in BUILTIN_MODELS:
        return _shape_from_dict(config_from_gguf(builtin_model_path(source.lower())), source)
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path.parent} has no config.json; point at a Hugging Face model folder")
    if not path.is_file():
        raise ConfigError(
            f"{source} is neither a file, a model folder nor a built-in model ({', '.join(BUILTIN_MODELS)})"
        )
    if path.suffix == ".gguf":
        return _shape_from_dict(config_from_gguf(path), str(path))
    if path.suffix in (".yaml", ".yml"):
        return _shape_from_source(model_source(_model_name_from_yaml(path), path))
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} is not a JSON object; expected a config.json")
    return _shape_from_dict(cfg, str(path))


def estimated_bytes(spec: str | os.PathLike[str], bytes_per_param: float) -> int | None:
    """About how many bytes the weights of `spec` take at `bytes_per_param` (from its config alone),
    for the free-space check before writing an output; None when the shape cannot be read."""
    try:
        return int(ModelShape.from_config(os.fspath(spec)).num_params() * bytes_per_param)
    except (QLoraKitError, OSError, ValueError, KeyError, TypeError):
        return None
