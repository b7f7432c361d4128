"""What a finished `qlorakit train` run leaves in output.dir, besides the metrics and checkpoints.

The adapter in PEFT format (and the best one under `best/` when the best validation step is not the last),
the tokenizer files, the resolved `config.yaml`, the loss curve, `summary.json` and a README. Every file
is written atomically and listed in train's output marker (`qlorakit.core.outputs`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from qlorakit.config import Config, config_to_dict
from qlorakit.core.atomic import atomic_write_text, make_temp_dir
from qlorakit.core.outputs import add_own_names
from qlorakit.methods import method_of_config
from qlorakit.train import checkpoint as ckpt
from qlorakit.train.loop import LoopState
from qlorakit.train.metrics import CSV, JSONL, PLOT, plot_loss_curve
from qlorakit.train.optim import trainable_named_parameters
from qlorakit.train.report import SUMMARY, RunSummary, render_summary

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TRAIN_OUTPUTS = (
    "adapter_config.json", "adapter_model.safetensors", "config.yaml", "README.md", SUMMARY, JSONL, CSV,
    PLOT, "checkpoints", "best", "tensorboard",
)  # fmt: skip
"""What train writes into output.dir (besides the tokenizer files), recorded in its output marker."""


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path) -> list[str]:
    """Tokenizer files into `out`, each renamed into place (no half-written file is ever visible) and
    listed in train's output marker; returns their names."""
    tmp = make_temp_dir(out, "tokenizer")
    try:
        tokenizer.save_pretrained(tmp)
        names = sorted(file.name for file in tmp.iterdir())
        for file in tmp.iterdir():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(file, out / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    add_own_names(out, "train", names)
    return names


def weights_bytes(folder: Path) -> int:
    """Bytes of the `.safetensors` files directly in `folder`: the trained weights a method saved there
    (the tokenizer, config and metrics beside them are not counted; nor are `checkpoints/` and `best/`)."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors") if p.is_file())


def _save_best_adapter(model: nn.Module, cfg: Config, state: LoopState, root: Path, out: Path) -> Path | None:
    """When the best validation step is not the last one, also write its adapter to `<out>/best/`."""
    if state.best_step is None or state.best_step == state.step:
        return None
    path = root / ckpt.checkpoint_name(state.best_step)
    ckpt.verify_checkpoint(path)
    best = load_file(path / "trainable.safetensors")
    params = dict(trainable_named_parameters(model))
    final = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(best[name])
        target = method_of_config(cfg).save(model, out / "best", cfg)
        for name, p in params.items():
            p.copy_(final[name])
    return target


def write_outputs(
    cfg: Config,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    state: LoopState,
    records: list[dict[str, Any]],
    summary: RunSummary,
) -> RunSummary:
    """Adapter (PEFT format), best adapter, tokenizer, resolved config, loss curve, summary (rank 0);
    returns the summary as written (with the loss curve's file name when one was plotted)."""
    out = Path(cfg.output.dir)
    saved = method_of_config(cfg).save(model, out, cfg)
    _save_best_adapter(model, cfg, state, out / "checkpoints", out)
    save_tokenizer(tokenizer, out)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    plotted = plot_loss_curve(records, out / PLOT) if cfg.output.plot else None
    # the README lists only files written
    summary = dataclasses.replace(
        summary, loss_curve=PLOT if plotted is not None else None, output_bytes=weights_bytes(saved)
    )
    summary.write(out)
    atomic_write_text(out / "README.md", render_summary(summary))
    return summary


__all__ = ["TRAIN_OUTPUTS", "save_tokenizer", "weights_bytes", "write_outputs"]
