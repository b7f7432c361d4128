"""Acceptance: a training process killed by SIGKILL and resumed with `--resume` ends with the adapter file
(byte for byte) and the per-step losses of an uninterrupted run. Killed at a seeded random step after the
first complete checkpoint, or in the middle of writing a later checkpoint (the older complete one is used);
a corrupted newest checkpoint is skipped for an older one; SIGINT saves a checkpoint and exits cleanly.

Where the signals land: every run is the real CLI (`qlorakit.cli.main`) started by `_DRIVER`, which wraps
two functions only to signal its own process at an exact point (after the metrics row of a given step, or
after the first file of a given checkpoint's temporary folder). A SIGKILL the process sends itself is the
same kill as one from outside (the kernel ends it, no Python runs), but it lands where the test says instead
of wherever a polling parent catches it, so every run proves what it claims and the runs can overlap.

The run exercises what a resume must restore: LoRA dropout 0.1 (masks come from the RNG states a checkpoint
restores), grad_accum 2 (the data position counts micro-batches) and packing (rows of several examples).
`quant.compute_dtype` is pinned to float32: the claims are about resuming, and must not change with the
CPU's bf16 detection (`QLORAKIT_CPU_BF16` or the CPU flags).
"""

from __future__ import annotations

import functools
import json
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.cli import run_all, write_tiny_setup
from qlorakit.core.errors import CheckpointError
from qlorakit.train import checkpoint as ckpt
from qlorakit.train.metrics import read_records

pytestmark = [pytest.mark.slow, pytest.mark.dtype_sensitive]
TIMEOUT = 600
STEPS, EVERY = 15, 3
# eval_every = save_every: a new best validation loss also writes a checkpoint, so evaluating at the
# checkpoint steps keeps the checkpoints exactly on the save_every schedule the assertions expect.
SETTINGS = (
    f"--train.max_steps={STEPS}", f"--train.save_every={EVERY}", f"--train.eval_every={EVERY}",
    "--train.batch_size=2", "--train.grad_accum=2", "--lora.dropout=0.1",
    "--data.packing=true", "--data.truncation=truncate", "--data.max_length=128",
    "--quant.compute_dtype=float32", "--output.samples=0",
)  # fmt: skip
# The seeded "random" points: a step strictly after the first complete checkpoint and before the last
# step for the SIGKILL and for the SIGINT, and a later checkpoint (not the first) to be killed writing.
_RNG = random.Random(20250917)
KILL_STEP = _RNG.randint(EVERY + 1, STEPS - 1)
INTERRUPT_STEP = _RNG.choice([s for s in range(EVERY + 1, STEPS) if s % EVERY])  # off the save schedule
WRITE_KILL_STEP = _RNG.choice(range(3 * EVERY, STEPS, EVERY))  # 2+ complete checkpoints before it

_DRIVER = r"""
import os, signal, sys
from qlorakit.cli import main
from qlorakit.train import checkpoint, metrics

fault, _, at = sys.argv[1].partition("@")
log, save_file = metrics.MetricsWriter.log, checkpoint.save_file

def log_and_signal(self, record):
    log(self, record)
    if record["split"] == "train":
        print(f"driver: trained step {record['step']}", file=sys.stderr, flush=True)
        if record["step"] == int(at or 0) and fault in ("sigkill", "sigint"):
            os.kill(os.getpid(), signal.SIGKILL if fault == "sigkill" else signal.SIGINT)

def save_and_kill(tensors, path, *args, **kwargs):
    save_file(tensors, path, *args, **kwargs)
    if fault == "sigkill-writing" and checkpoint.checkpoint_name(int(at)) in path.parent.name:
        os.kill(os.getpid(), signal.SIGKILL)  # the checkpoint's folder holds this one file

metrics.MetricsWriter.log, checkpoint.save_file = log_and_signal, save_and_kill
sys.exit(main(sys.argv[2:]))
"""


def _command(config: Path, out: Path, fault: str, *args: str) -> list[str]:
    """`qlorakit train CONFIG SETTINGS --output.dir=OUT ARGS` under `_DRIVER` with `fault`
    (`none`, `sigkill@STEP`, `sigint@STEP` or `sigkill-writing@STEP`)."""
    driver = [sys.executable, "-c", _DRIVER, fault]
    return [*driver, "train", str(config), *SETTINGS, f"--output.dir={out}", *args]


# Run the commands at the same time (one thread each) and wait for all of them.
_run_all = functools.partial(run_all, timeout=TIMEOUT)


def _trained_steps(proc: subprocess.CompletedProcess) -> list[int]:
    """The optimizer steps this process completed (the driver reports each train metrics row)."""
    return [int(s) for s in re.findall(r"driver: trained step (\d+)\n", proc.stderr)]


def _resumed_from(proc: subprocess.CompletedProcess) -> int:
    """The step of the checkpoint the run says it resumed from, checked against that checkpoint's manifest."""
    found = re.findall(r"resuming from (\S+) \(step (\d+)\)", proc.stdout)
    assert len(found) == 1, proc.stdout[-2000:]
    path, step = Path(found[0][0]), int(found[0][1])
    assert path.name == ckpt.checkpoint_name(step)
    assert ckpt.verify_checkpoint(path)["step"] == step
    assert json.loads((path / "trainer_state.json").read_text())["step"] == step
    return step


def _checkpoints(out: Path) -> list[tuple[int, str]]:
    """(step, "complete" or what is wrong with it) of every visible checkpoint folder, oldest first."""
    found = []
    for step, path in ckpt.list_checkpoints(out / "checkpoints"):
        try:
            ckpt.verify_checkpoint(path)
            found.append((step, "complete"))
        except CheckpointError as exc:
            found.append((step, str(exc)))
    return found


def _complete(*steps: int) -> list[tuple[int, str]]:
    return [(step, "complete") for step in steps]


def _temporaries(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").iterdir() if p.name.startswith("."))


def _curve(out: Path) -> list[tuple]:
    """Every metrics row but its timings: (split, step, loss, ...) in file order."""
    keys = ("split", "step", "epoch", "loss", "lr", "grad_norm", "tokens")
    return [tuple(r.get(k) for k in keys) for r in read_records(out / "metrics.jsonl")]


def _assert_resumed_like_reference(
    proc: subprocess.CompletedProcess, out: Path, ref: Path, step: int
) -> None:
    """Resumed from the checkpoint of `step`, trained exactly the remaining steps, ended as the reference."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _resumed_from(proc) == step
    assert _trained_steps(proc) == list(range(step + 1, STEPS + 1))
    assert _curve(out) == _curve(ref)  # per-step train losses, grad norms, val losses: bit for bit
    name = "adapter_model.safetensors"
    assert (out / name).read_bytes() == (ref / name).read_bytes(), "the adapter differs from the reference"
    assert not _temporaries(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Phase 1: the uninterrupted reference and the three interrupted runs, side by side. Then a copy of
    the run killed mid-write gets its newest complete checkpoint truncated. Phase 2: the four resumes."""
    root = tmp_path_factory.mktemp("kill")
    config = write_tiny_setup(root)
    faults = {
        "reference": "none",
        "killed": f"sigkill@{KILL_STEP}",
        "killed_writing": f"sigkill-writing@{WRITE_KILL_STEP}",
        "interrupted": f"sigint@{INTERRUPT_STEP}",
    }
    out = {name: root / name for name in faults}
    first = dict(
        zip(faults, _run_all(*(_command(config, out[n], f) for n, f in faults.items())), strict=True)
    )
    before = {name: _curve(path) for name, path in out.items()}
    checkpoints = {name: _checkpoints(path) for name, path in out.items()}
    temporaries = {
        name: {p: sorted(c.name for c in p.iterdir()) for p in _temporaries(path)}
        for name, path in out.items()
    }
    adapters = {name: (path / "adapter_model.safetensors").exists() for name, path in out.items()}
    out["corrupted"] = root / "corrupted"
    shutil.copytree(out["killed_writing"], out["corrupted"])
    newest = [step for step, state in checkpoints["killed_writing"] if state == "complete"][-1]
    weights = out["corrupted"] / "checkpoints" / ckpt.checkpoint_name(newest)
    weights /= "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: half-written data
    names = ("killed", "killed_writing", "corrupted", "interrupted")
    resumed = _run_all(*(_command(config, out[n], "none", "--resume") for n in names))
    return {
        "out": out,
        "first": first,
        "before": before,
        "checkpoints": checkpoints,
        "temporaries": temporaries,
        "adapters": adapters,
        "resumed": dict(zip(names, resumed, strict=True)),
    }


def test_reference_run_trains_every_step_and_checkpoints_on_schedule(runs):
    proc = runs["first"]["reference"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _trained_steps(proc) == list(range(1, STEPS + 1))
    rows, examples = map(int, re.search(r"(\d+) rows \(packed from (\d+) examples\)", proc.stdout).groups())
    assert rows < examples  # packing really put several examples in a row
    assert runs["checkpoints"]["reference"] == _complete(*range(EVERY, STEPS + 1, EVERY))
    assert [s for split, s, *_ in runs["before"]["reference"] if split == "train"] == list(
        range(1, STEPS + 1)
    )


def test_sigkill_at_a_seeded_random_step_then_resume_ends_like_an_uninterrupted_run(runs):
    proc, out = runs["first"]["killed"], runs["out"]["killed"]
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _trained_steps(proc) == list(range(1, KILL_STEP + 1))
    newest = (KILL_STEP - 1) // EVERY * EVERY  # the kill lands before step KILL_STEP's own checkpoint
    assert runs["checkpoints"]["killed"] == _complete(*range(EVERY, newest + 1, EVERY)) and newest >= EVERY
    assert not runs["adapters"]["killed"]  # it really was cut short
    # metrics rows past the checkpoint existed: the resumed run must drop them, then redo those steps
    assert [s for split, s, *_ in runs["before"]["killed"] if split == "train"][-1] == KILL_STEP
    _assert_resumed_like_reference(runs["resumed"]["killed"], out, runs["out"]["reference"], newest)


def test_sigkill_while_writing_a_later_checkpoint_resumes_from_the_older_complete_one(runs):
    proc, out = runs["first"]["killed_writing"], runs["out"]["killed_writing"]
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _trained_steps(proc) == list(range(1, WRITE_KILL_STEP + 1))
    older = list(range(EVERY, WRITE_KILL_STEP, EVERY))
    assert runs["checkpoints"]["killed_writing"] == _complete(*older)  # the one being written is not visible
    ((half, files),) = runs["temporaries"]["killed_writing"].items()  # ... it is a hidden temporary
    assert half.name.startswith(f".{ckpt.checkpoint_name(WRITE_KILL_STEP)}.")
    assert files == ["trainable.safetensors"]  # cut off after its first file: no manifest
    resumed = runs["resumed"]["killed_writing"]
    assert f"removed the unfinished checkpoint folder {half}" in resumed.stdout
    _assert_resumed_like_reference(resumed, out, runs["out"]["reference"], older[-1])


def test_corrupted_newest_checkpoint_falls_back_to_the_older_one(runs):
    """The copy of the mid-write kill with its newest complete checkpoint truncated: the temporary is
    removed, the truncated checkpoint skipped (its checksum fails), the one before it used."""
    resumed, out = runs["resumed"]["corrupted"], runs["out"]["corrupted"]
    older = list(range(EVERY, WRITE_KILL_STEP, EVERY))
    assert (
        "skipping invalid checkpoint" in resumed.stdout and ckpt.checkpoint_name(older[-1]) in resumed.stdout
    )
    _assert_resumed_like_reference(resumed, out, runs["out"]["reference"], older[-2])


def test_sigint_saves_a_checkpoint_exits_cleanly_and_resumes_like_an_uninterrupted_run(runs):
    proc, out = runs["first"]["interrupted"], runs["out"]["interrupted"]
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"interrupted at step {INTERRUPT_STEP}:" in proc.stdout and "--resume" in proc.stdout
    assert _trained_steps(proc) == list(range(1, INTERRUPT_STEP + 1))
    scheduled = list(range(EVERY, INTERRUPT_STEP, EVERY))
    assert runs["checkpoints"]["interrupted"] == _complete(*scheduled, INTERRUPT_STEP)  # saved on the way out
    assert not runs["adapters"]["interrupted"]
    _assert_resumed_like_reference(
        runs["resumed"]["interrupted"], out, runs["out"]["reference"], INTERRUPT_STEP
    )
