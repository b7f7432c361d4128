"""Run folders for the `qlorakit compare` tests: synthetic ones with chosen numbers (as `qlorakit train`
leaves them), a tiny project to train for real, and a check that a PNG holds a drawing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from helpers.cli import TINY_LORA, reverse_word_rows, write_train_yaml
from helpers.tiny import save_tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> Any:
    """`path` is a PNG of more than 100 x 100 pixels with something drawn on it; returns its pixels."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # something was drawn
    return pixels


def synthetic_run(
    folder: Path,
    *,
    peak: float,
    elapsed: list[float],
    val: float,
    train_loss: float,
    quantization: str,
    seed: int = 7,
    adapter_rows: int = 8,
    config: dict[str, Any] | None = None,
    **summary: Any,
) -> Path:
    """A run folder as `qlorakit train` leaves it, with chosen numbers (elapsed_s per logged step).

    `config`: sections merged over the minimal resolved config; `summary`: summary.json keys to set."""
    folder.mkdir(parents=True)
    steps = len(elapsed)
    records = []
    for step, t in enumerate(elapsed, start=1):
        records.append(
            {
                "step": step,
                "split": "train",
                "loss": 3.0 - 0.1 * step,
                "elapsed_s": t,
                "tokens": 100 * step,
                "tokens_per_s": 100.0,
            }
        )
        if step % 2 == 0:
            records.append(
                {"step": step, "split": "val", "loss": val + 0.05 * (steps - step), "elapsed_s": t}
            )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    values = {
        "output_dir": str(folder),
        "base_model": "tiny",
        "quantization": quantization,
        "lora_r": 8,
        "lora_alpha": 16,
        "trainable": "trainable",
        "data_summary": "data",
        "steps": steps,
        "total_steps": steps,
        "stop_reason": "max_steps",
        "epochs": 1.0,
        "world_size": 1,
        "final_train_loss": train_loss,
        "val_loss_before": 3.5,
        "val_loss_after": val,
        "best_val_loss": val,
        "best_step": steps,
        "samples": 2,
        "exact_before": 0,
        "exact_after": 1,
        "generations": [],
        "wall_time_s": 30.0,
        "train_time_s": elapsed[-1],
        "tokens_per_s": 100 * steps / elapsed[-1],
        "peak_rss_mib": peak,
    }
    (folder / "summary.json").write_text(json.dumps({**values, **summary}))
    save_file(
        {"lora_A": torch.zeros(adapter_rows, 64), "lora_B": torch.zeros(64, adapter_rows)},
        str(folder / "adapter_model.safetensors"),
    )
    resolved = {
        "quant": {"enabled": quantization != "16-bit", "compute_dtype": "auto"},
        "train": {"seed": seed, "max_steps": steps},
        "output": {"dir": str(folder)},
    }
    for section, keys in (config or {}).items():
        resolved[section] = {**resolved.get(section, {}), **keys} if isinstance(keys, dict) else keys
    (folder / "config.yaml").write_text(yaml.safe_dump(resolved))
    return folder


def tiny_compare_setup(root: Path, rows: int = 40) -> Path:
    """A tiny Llama folder + tokenizer, a tiny Alpaca file and a YAML config pointing at them."""
    save_tiny_model(root / "model")
    rows = reverse_word_rows(rows, words=["hello", "fox", "dog", "brown", "quick", "lazy"])
    (root / "alpaca.json").write_text(json.dumps(rows))
    return write_train_yaml(
        root / "train.yaml",
        model=root / "model",
        data=root / "alpaca.json",
        out=root / "unused",
        lora=TINY_LORA,
        data_settings={"max_length": 48, "val_ratio": 0.2},
        train={
            "max_steps": 20,
            "batch_size": 4,
            "lr": 1e-2,
            "eval_every": 2,
            "save_every": 50,
            "num_threads": 1,
            "seed": 3,
        },
        output={"samples": 2, "tensorboard": False},
    )
