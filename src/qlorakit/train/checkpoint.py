"""Training checkpoints: atomic, checksummed, safetensors + JSON only, resumable bit for bit.

`<output>/checkpoints/step-000120/` holds
- `trainable.safetensors`: every trainable parameter by its module path (the LoRA weights),
- `optimizer.safetensors` + `optimizer.json`: optimizer tensors, and its scalars / param groups,
- `rng.safetensors` + `rng.json`: each rank's torch CPU (and CUDA) generator states as uint8 tensors,
  and its Python `random` / numpy states,
- `trainer_state.json`: step, data position, best validation loss, early-stopping counters and the
  configuration fingerprint that a resume must match,
- `manifest.json` (written last): the `complete` marker with the size and SHA-256 of every file.
The folder is built under a temporary name and renamed into place, so a killed writer leaves only a
dot-prefixed temporary folder that is never read; a folder whose manifest is missing or whose checksums
do not match is skipped by `latest_valid_checkpoint` and refused by `load_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, load_file, save, save_file

from qlorakit.core.atomic import atomic_directory
from qlorakit.core.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{6,})$")
_STALE_TMP = re.compile(r"^\.step-\d{6,}\..*\.tmp$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class LoadedCheckpoint:
    path: Path
    trainable: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    """In `torch.optim.Optimizer.state_dict()` layout, ready for `load_state_dict`."""
    rng_states: list[bytes]
    """One serialized RNG bundle per rank (see `capture_rng_state`)."""
    trainer_state: dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# RNG states: one self-contained bytes blob per rank so ranks can exchange them.


def capture_rng_state() -> bytes:
    """This process's torch CPU/CUDA, Python and numpy RNG states as a safetensors blob."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    meta = {
        "python": json.dumps([py_version, list(py_state), py_gauss]),
        "numpy": json.dumps([np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)]),
    }
    return save(tensors, metadata=meta)


def restore_rng_state(blob: bytes) -> None:
    """Inverse of `capture_rng_state` for the current process."""
    tensors = load(blob)
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    meta = _blob_metadata(blob)
    py_version, py_state, py_gauss = json.loads(meta["python"])
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = json.loads(meta["numpy"])
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))


def _blob_metadata(blob: bytes) -> dict[str, str]:
    # safetensors' header is an 8-byte little-endian length followed by JSON; `__metadata__` holds ours.
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n])["__metadata__"]


# ---------------------------------------------------------------------------------------------------------
# Optimizer state <-> (tensors by parameter name, JSON scalars).


def split_optimizer_state(
    state_dict: dict[str, Any], param_names: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`optimizer.state_dict()` -> tensors keyed `state/<param>/<key>` and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state_dict["state"].items():
        name = param_names[idx]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{name}/{key}"] = value.detach().cpu().contiguous()
            elif isinstance(value, int | float | bool | str) or value is None:
                scalars.setdefault(name, {})[key] = value
            else:
                raise CheckpointError(f"optimizer state {name}.{key} has type {type(value).__name__}")
    groups = []
    for group in state_dict["param_groups"]:
        plain = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        plain["params"] = [param_names[i] for i in group["params"]]
        groups.append(plain)
    json.dumps(groups)  # fails loudly on a value JSON cannot hold
    return tensors, {"scalars": scalars, "param_groups": groups}


def join_optimizer_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], param_names: list[str], source: str
) -> dict[str, Any]:
    """Inverse of `split_optimizer_state` for an optimizer over `param_names` (in order)."""
    index = {name: i for i, name in enumerate(param_names)}
    saved = [n for g in meta["param_groups"] for n in g["params"]]
    if saved != param_names:
        missing = sorted(set(param_names) - set(saved))[:3]
        extra = sorted(set(saved) - set(param_names))[:3]
        raise CheckpointError(
            f"{source}: the optimizer was saved for other trainable parameters "
            f"(missing {missing}, unexpected {extra}); resume with the same lora settings"
        )
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, name, field = key.split("/", 2)
        state.setdefault(index[name], {})[field] = value
    for name, values in meta["scalars"].items():
        state.setdefault(index[name], {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        restored = {k: (tuple(v) if isinstance(v, list) else v) for k, v in group.items() if k != "params"}
        restored["params"] = [index[n] for n in group["params"]]
        groups.append(restored)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------------------
# Writing, validating, finding, loading, pruning.


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    root: Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    param_names: list[str],
    rng_states: list[bytes],
    trainer_state: dict[str, Any],
) -> Path:
    """Write `root/step-NNNNNN/` atomically; `rng_states` has one blob per rank (rank order)."""
    target = root / checkpoint_name(step)
    opt_tensors, opt_meta = split_optimizer_state(optimizer_state, param_names)
    rng_tensors: dict[str, torch.Tensor] = {}
    rng_meta: dict[str, Any] = {}
    for rank, blob in enumerate(rng_states):
        for key, value in load(blob).items():
            rng_tensors[f"rank{rank}.{key}"] = value
        rng_meta[f"rank{rank}"] = {k: json.loads(v) for k, v in _blob_metadata(blob).items()}
    with atomic_directory(target) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors"
        )
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta, indent=1) + "\n")
        save_file(rng_tensors, tmp / "rng.safetensors")
        (tmp / "rng.json").write_text(json.dumps(rng_meta) + "\n")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {"complete": True, "format_version": FORMAT_VERSION, "step": step, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint; CheckpointError saying what is wrong otherwise."""
    manifest_path = path / MANIFEST
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such folder; set train.resume to a checkpoint folder such as "
            "OUTPUT_DIR/checkpoints/step-000020, or to auto (the newest one in output.dir)"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder (OUTPUT_DIR/checkpoints/step-N)")
    if not manifest_path.is_file() and list_checkpoints(path / "checkpoints"):
        raise CheckpointError(
            f"{path} is a training output folder, not a checkpoint; set train.resume to one of its "
            f"checkpoints ({path / 'checkpoints'}/step-N), or use --resume with output.dir={path}"
        )
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (the checkpoint was not finished writing)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        complete = manifest["complete"] is True
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    if not complete:
        raise CheckpointError(f"{manifest_path}: checkpoint is not marked complete")
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in the manifest but missing")
        if file.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, the manifest says {info['bytes']}")
        if _sha256(file) != info["sha256"]:
            raise CheckpointError(f"{file}: checksum does not match the manifest (corrupted)")
    return manifest


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-*` folder under `root`, oldest first (validity not checked)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def latest_valid_checkpoint(root: Path, notes: list[str] | None = None) -> Path | None:
    """The newest checkpoint under `root` that verifies; invalid ones are reported in `notes`."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            if notes is not None:
                notes.append(f"skipping invalid checkpoint: {exc}")
            continue
        return path
    return None


def load_checkpoint(path: Path, param_names: list[str]) -> LoadedCheckpoint:
    """Verify then read a checkpoint for an optimizer over `param_names` (trainable params, in order)."""
    verify_checkpoint(path)
    try:
        trainable = load_file(path / "trainable.safetensors")
        opt_tensors = load_file(path / "optimizer.safetensors")
        opt_meta = json.loads((path / "optimizer.json").read_text())
        rng_tensors = load_file(path / "rng.safetensors")
        rng_meta = json.loads((path / "rng.json").read_text())
        trainer_state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from exc
    rng_states = []
    for rank in range(len(rng_meta)):
        prefix = f"rank{rank}."
        tensors = {k[len(prefix) :]: v for k, v in rng_tensors.items() if k.startswith(prefix)}
        meta = {k: json.dumps(v) for k, v in rng_meta[f"rank{rank}"].items()}
        rng_states.append(save(tensors, metadata=meta))
    optimizer_state = join_optimizer_state(opt_tensors, opt_meta, param_names, str(path))
    return LoadedCheckpoint(path, trainable, optimizer_state, rng_states, trainer_state)


def prune_checkpoints(root: Path, keep_last: int, keep_steps: set[int] = frozenset()) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and those in `keep_steps` (e.g. the best)."""
    found = list_checkpoints(root)
    newest = {step for step, _ in found[-keep_last:]} if keep_last > 0 else set()
    removed = []
    for step, path in found:
        if step not in newest and step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Remove half-written checkpoint folders left by a killed writer (dot-prefixed `.tmp` folders)."""
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and _STALE_TMP.match(p.name)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


# Training settings a resume compares with the checkpoint's (saved under "train" in its run settings).
TRAIN_KEYS = (
    "optim", "weight_decay", "lr", "schedule", "warmup_steps", "batch_size", "grad_accum", "max_grad_norm",
    "max_steps", "epochs",
)  # fmt: skip
_STATE_KEYS = ("optim", "weight_decay")
"""Carried by the optimizer state itself: a new value could not take effect, so a change is refused."""
_DECAY_KEYS = ("max_steps", "epochs")
"""They set the total number of steps, which only a decaying schedule (linear, cosine) depends on."""


def _changed_training(saved: dict[str, Any], current: dict[str, Any], path: Path) -> list[str]:
    """Refuse changes the optimizer state cannot honour; describe the others (they break exactness)."""
    if not isinstance(saved, dict):
        return []  # a checkpoint from before training settings were recorded: nothing to compare
    changed = [k for k in TRAIN_KEYS if k in saved and k in current and saved[k] != current[k]]
    refused = [k for k in changed if k in _STATE_KEYS]
    if refused:
        listed = ", ".join(f"train.{k}: checkpoint {saved[k]!r} vs now {current[k]!r}" for k in refused)
        raise CheckpointError(
            f"{path}: cannot resume with a changed {listed}: the saved optimizer state carries its own "
            "value, so the new one could not take effect; restore it, or start a new run in another output.dir"
        )
    decays = saved.get("schedule") != "constant" or current.get("schedule") != "constant"
    changed = [k for k in changed if k not in _DECAY_KEYS or decays]
    if not changed:
        return []
    listed = "; ".join(f"train.{k} {saved[k]!r} -> {current[k]!r}" for k in changed)
    return [
        f"resuming with changed training settings ({listed}): they apply from the checkpoint's step on, so "
        "this run is no longer identical to an uninterrupted run with either the old or the new settings"
    ]


_OLDER_RUNS = {"method": "lora"}
"""Run settings that checkpoints written before the setting existed hold implicitly."""


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> list[str]:
    """Refuse to resume when the run-defining settings differ (names every differing key).

    Training settings (`current["train"]`) are compared too: a changed optimizer or weight decay is
    refused, any other change is allowed and returned as a note saying the resume is no longer exact.
    """
    saved = {**_OLDER_RUNS, **saved}
    diffs = [
        f"{key}: checkpoint {json.dumps(saved.get(key))} vs now {json.dumps(current[key])}"
        for key in current
        if key != "train" and saved.get(key) != current[key]
    ]
    if diffs:
        listed = "\n  - ".join(diffs)
        raise CheckpointError(
            f"{path}: cannot resume, the run settings changed:\n  - {listed}\n"
            "restore those settings, or start a new run in another output.dir"
        )
    return _changed_training(saved.get("train"), current.get("train") or {}, path)
