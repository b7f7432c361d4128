"""One typed, frozen configuration tree for every pipeline.

YAML files and `--section.key=value` overrides only *fill* these dataclasses; nothing reads settings any
other way. `load_config` checks every key and type and every cross-field rule, and reports all problems
at once in a single `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from qlorakit.core.errors import ConfigError
from qlorakit.core.fill import build, parse_override
from qlorakit.quant.settings import QuantSettings, blocksize_problem


def documented(
    default: Any = dataclasses.MISSING, text: str = "", *, factory: Any = dataclasses.MISSING
) -> Any:
    """A config field with `text` as its `help` metadata: what `qlorakit train --help` prints for it."""
    return field(default=default, default_factory=factory, metadata={"help": text})


@dataclass(frozen=True)
class ModelConfig:
    name: str = documented(
        "smollm2-135m",
        "A local Hugging Face folder, a local .gguf file, or the built-in name `smollm2-135m`.",
    )
    trust_remote_code: bool = documented(
        False, "Run model code shipped with the checkpoint. Off unless you trust the source."
    )


@dataclass(frozen=True)
class QuantConfig:
    enabled: bool = documented(
        True, "Store the frozen base in 4 bits (QLoRA). False trains 16-bit LoRA on a plain base."
    )
    quant_type: Literal["nf4", "fp4"] = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = documented(
        "auto", "`auto`: bf16 where the device computes it natively, else fp32."
    )
    skip: list[str] = documented(
        text="Linear layers kept in 16 bits (name suffixes).", factory=lambda: ["lm_head"]
    )

    def to_settings(self, compute_dtype: torch.dtype | None) -> QuantSettings:
        """quant's own settings for this section; `compute_dtype` is `compute_dtype` resolved for the device."""
        return QuantSettings(
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            double_quant=self.double_quant,
            skip=tuple(self.skip),
            compute_dtype=compute_dtype,
        )


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | list[str] = documented(
        "all-linear",
        "Module-name suffixes, a regex string, or `all-linear` (every linear layer but the output head).",
    )
    exclude_modules: list[str] = field(default_factory=list)
    layers_to_transform: list[int] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init: Literal["default", "gaussian"] = "default"


@dataclass(frozen=True)
class DatasetSpec:
    path: str = documented(
        "builtin", "A JSON/JSONL/text file, a `datasets` folder saved with save_to_disk, or `builtin`."
    )
    format: Literal["auto", "alpaca", "chat", "sharegpt", "text"] = "auto"
    weight: float = documented(1.0, "Relative sampling weight when several datasets are mixed.")


@dataclass(frozen=True)
class DataConfig:
    datasets: list[DatasetSpec] = field(default_factory=lambda: [DatasetSpec()])
    val_path: str | None = documented(
        None, "A separate validation file; otherwise `val_ratio` of the training rows are held out."
    )
    val_ratio: float = 0.1
    template: Literal["auto", "chat", "alpaca", "text"] = documented(
        "auto", "`auto`: the tokenizer's chat template when it has one, else the Alpaca template."
    )
    max_length: int = 256
    truncation: Literal["truncate", "drop"] = documented(
        "truncate", "Rows longer than max_length are cut on the right (`truncate`) or left out (`drop`)."
    )
    train_on_prompt: bool = False
    packing: bool = False
    skip_invalid: bool = False
    max_rows: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = documented(60, "Optimizer steps. With `epochs` set, the smaller of the two limits wins.")
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = documented(
        1e-3,
        "1e-3 suits the small default model and short demo; QLoRA used 2e-4 for 7B+ models (1e-4 for 33B+).",
    )
    weight_decay: float = 0.0
    optim: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 5
    max_grad_norm: float | None = 0.3
    gradient_checkpointing: bool = True
    seed: int = 42
    eval_every: int = 20
    eval_batches: int | None = None
    early_stopping_patience: int | None = None
    log_every: int = 1
    save_every: int = 20
    keep_last: int = 2
    resume: str = documented(
        "never", "`never`, `auto` (newest valid checkpoint in the output folder), or a checkpoint folder."
    )
    num_threads: int | None = None


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/qlorakit-default"
    overwrite: bool = documented(
        False,
        "Write into an output.dir that holds files qlorakit train did not write (files with train's names are replaced). Never allowed for a folder holding the model or the data.",
    )
    tensorboard: bool = documented(
        True, "Also log to TensorBoard when the `tensorboard` package is installed."
    )
    plot: bool = True
    samples: int = documented(
        24,
        "Held-out examples generated before and after training for the summary (exact match before/after). Enough that one example is ~4% and a change means something; each costs a short greedy generation.",
    )


@dataclass(frozen=True)
class Config:
    method: Literal["lora"] = documented(
        "lora",
        "Fine-tuning method: lora (with quant.enabled: QLoRA; lora.use_dora: DoRA). One method per run.",
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ---------------------------------------------------------------------------------------------------------
# Rules that types cannot express, and the entry points.


def lora_regex_problems(lo: LoRAConfig) -> list[str]:
    """LoRA keys read as regular expressions that do not compile (named with the regex error)."""
    patterns: list[tuple[str, str]] = []
    if isinstance(lo.target_modules, str) and lo.target_modules != "all-linear":
        patterns.append(("lora.target_modules", lo.target_modules))
    if isinstance(lo.exclude_modules, str):  # a PEFT adapter_config may carry a regex here
        patterns.append(("lora.exclude_modules", lo.exclude_modules))
    patterns += [(f"lora.rank_pattern.{k}", k) for k in lo.rank_pattern]
    patterns += [(f"lora.alpha_pattern.{k}", k) for k in lo.alpha_pattern]
    errs = []
    for key, pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            errs.append(
                f"{key}: {pattern!r} is not a valid regular expression ({exc}); escape special characters "
                "such as [ ( . with a backslash, or give target_modules as a list of module names"
            )
    return errs


def _lora_problems(lo: LoRAConfig) -> list[str]:
    errs = []
    if lo.r <= 0:
        errs.append(f"lora.r: must be a positive integer, got {lo.r}")
    if not lo.alpha > 0:  # also catches NaN
        errs.append(f"lora.alpha: must be > 0 (the update is scaled by alpha / r), got {lo.alpha}")
    for name, alpha in lo.alpha_pattern.items():
        if not alpha > 0:
            errs.append(f"lora.alpha_pattern.{name}: must be > 0, got {alpha}")
    if not 0.0 <= lo.dropout < 1.0:
        errs.append(f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    for name, rank in lo.rank_pattern.items():
        if rank <= 0:
            errs.append(f"lora.rank_pattern.{name}: must be a positive integer, got {rank}")
    return errs + lora_regex_problems(lo)


def _check_rules(cfg: Config) -> list[str]:
    """Cross-field rules and value ranges that types cannot express."""
    errs: list[str] = []
    q, lo, d, t = cfg.quant, cfg.lora, cfg.data, cfg.train
    blocksize_error = blocksize_problem(q.blocksize)
    if blocksize_error is not None:
        errs.append(f"quant.blocksize: {blocksize_error}, got {q.blocksize}")
    errs.extend(_lora_problems(lo))
    if not d.datasets:
        errs.append("data.datasets: needs at least one dataset")
    for i, spec in enumerate(d.datasets):
        if spec.weight <= 0:
            errs.append(f"data.datasets[{i}].weight: must be > 0, got {spec.weight}")
    if not 0.0 <= d.val_ratio < 1.0:
        errs.append(f"data.val_ratio: must be in [0, 1), got {d.val_ratio}")
    if d.max_length < 8:
        errs.append(f"data.max_length: must be at least 8, got {d.max_length}")
    for key in (
        "max_steps",
        "batch_size",
        "grad_accum",
        "log_every",
        "save_every",
        "eval_every",
        "keep_last",
    ):
        if getattr(t, key) <= 0:
            errs.append(f"train.{key}: must be a positive integer, got {getattr(t, key)}")
    if t.lr <= 0:
        errs.append(f"train.lr: must be > 0, got {t.lr}")
    if t.epochs is not None and t.epochs <= 0:
        errs.append(f"train.epochs: must be > 0, got {t.epochs}")
    if t.warmup_steps < 0:
        errs.append(f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        errs.append(f"train.max_grad_norm: must be > 0 or null (no clipping), got {t.max_grad_norm}")
    if t.early_stopping_patience is not None and t.early_stopping_patience <= 0:
        errs.append(
            f"train.early_stopping_patience: must be a positive integer, got {t.early_stopping_patience}"
        )
    if t.early_stopping_patience is not None and d.val_ratio == 0 and d.val_path is None:
        errs.append(
            "train.early_stopping_patience: needs validation data (data.val_ratio > 0 or data.val_path)"
        )
    if d.packing and d.truncation == "drop":
        errs.append(
            "data.packing: packed rows are cut at max_length; use data.truncation=truncate with packing"
        )
    if q.compute_dtype == "float16" and q.enabled is False:
        errs.append("quant.compute_dtype: float16 only applies to a 4-bit base (quant.enabled=true)")
    return errs


def config_from_dict(
    data: dict[str, Any] | None, overrides: list[str] = (), source: str = "config"
) -> Config:
    """Fill `Config` from a plain mapping plus overrides; raise one ConfigError listing every problem."""
    import copy

    merged: dict[str, Any] = copy.deepcopy(data) if data else {}
    errors: list[str] = []
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    cfg = build(Config, merged, "", errors)
    if not errors:
        errors.extend(_check_rules(cfg))
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ConfigError(f"{source}: {len(errors)} problem(s):\n{lines}")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or only defaults when `path` is None) and apply `--section.key=value` overrides."""
    import yaml

    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if loaded is None:
            raise ConfigError(
                f"{p}: the file is empty (no settings); write the sections you need (model, data, train, "
                "...), or leave the file out: `qlorakit train` alone runs the built-in demo, and "
                "--section.key=value overrides work without a file"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model, quant, lora, ...)")
        data = loaded
    return config_from_dict(data, overrides, source=source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a config (for writing the resolved config next to the outputs)."""
    return dataclasses.asdict(cfg)


def replace(cfg: Config, **sections: Any) -> Config:
    """A copy of `cfg` with whole sections replaced (configs are frozen)."""
    return dataclasses.replace(cfg, **sections)
