"""A tiny project on disk and the real CLI run on it in subprocesses.

`write_train_yaml` is the one place a test writes a training config: the model folder, one data file and
the output folder, plus the sections a test sets (`lora`, `data`, `train`, `output`, `quant`).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from helpers.tiny import save_tiny_model

WORDS = ["hello", "fox", "dog", "brown", "quick", "lazy", "over", "jumps"]
TINY_LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
QUIET_OUTPUT = {"samples": 1, "plot": False, "tensorboard": False}  # one sample, no plot, no TensorBoard


def cli_env() -> dict[str, str]:
    """The environment for a CLI subprocess: offline, one thread."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    return env


def cli_command(config: Path, *args: str) -> list[str]:
    """`python -m qlorakit train CONFIG ARGS`."""
    return [sys.executable, "-m", "qlorakit", "train", str(config), *args]


def run_all(*cmds: list[str], timeout: float) -> list[subprocess.CompletedProcess]:
    """Run the commands at the same time (each with `cli_env()`) and wait for all of them."""
    procs = [
        subprocess.Popen(c, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in cmds
    ]
    done = []
    for cmd, proc in zip(cmds, procs, strict=True):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_train_yaml(
    path: Path,
    *,
    model: Path,
    data: Path,
    out: Path,
    lora: dict[str, Any],
    data_settings: dict[str, Any],
    train: dict[str, Any],
    output: dict[str, Any],
    quant: dict[str, Any] | None = None,
) -> Path:
    """A training YAML at `path`: `model.name`, one dataset, `output.dir` and the given sections."""
    cfg: dict[str, Any] = {
        "model": {"name": str(model)},
        "lora": lora,
        "data": {"datasets": [{"path": str(data)}], **data_settings},
        "train": train,
        "output": {"dir": str(out), **output},
    }
    if quant is not None:
        cfg["quant"] = quant
    path.write_text(yaml.safe_dump(cfg))
    return path


def reverse_word_rows(n: int, words: list[str] = WORDS, seed: int = 0) -> list[dict[str, str]]:
    """`n` Alpaca rows "Reverse the word." with words drawn by a seeded RNG."""
    rng = random.Random(seed)
    return [
        {"instruction": "Reverse the word.", "input": w, "output": w[::-1]}
        for w in (rng.choice(words) for _ in range(n))
    ]


def write_tiny_setup(root: Path, rows: int = 48, quant: bool = True) -> Path:
    """`root/model` (tiny Llama + tokenizer), `root/alpaca.json`, `root/train.yaml`; returns the YAML."""
    save_tiny_model(root / "model")
    (root / "alpaca.json").write_text(json.dumps(reverse_word_rows(rows)))
    return write_train_yaml(
        root / "train.yaml",
        model=root / "model",
        data=root / "alpaca.json",
        out=root / "out",
        quant={"enabled": quant},
        lora={"r": 8, "alpha": 16, "dropout": 0.1},
        data_settings={"max_length": 64, "val_ratio": 0.1},
        train={
            "max_steps": 12,
            "batch_size": 4,
            "lr": 5e-3,
            "eval_every": 4,
            "save_every": 4,
            "keep_last": 10,
            "num_threads": 1,
            "seed": 7,
        },
        output={"samples": 2},
    )


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")
