"""Acceptance: a training process killed at a random moment (SIGKILL, also mid-checkpoint-write) and resumed
ends with an adapter bit-identical to an uninterrupted run; SIGINT saves a checkpoint and exits cleanly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _tinytrain import adapter_tensors, cli_command, cli_env, write_tiny_setup

from qlorakit.train import checkpoint as ckpt

pytestmark = pytest.mark.slow
TIMEOUT = 600


def _run(config: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cli_command(config, f"--output.dir={out}", *args),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _start(config: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(config, f"--output.dir={out}"),
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate, proc: subprocess.Popen, poll: float) -> bool:
    """Poll until `predicate()` or the process ends; True when the predicate fired first."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError("training subprocess did not reach the expected state")


def _has_checkpoint(root: Path) -> bool:
    return any((p / ckpt.MANIFEST).exists() for _, p in ckpt.list_checkpoints(root))


def _writing(root: Path) -> bool:
    return root.is_dir() and any(e.name.startswith(".step-") for e in os.scandir(root))


def _assert_identical(a: Path, b: Path) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert set(ta) == set(tb) and ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    config = write_tiny_setup(root)
    _run(config, root / "reference")
    return config, root


def test_sigkill_after_first_checkpoint_then_resume_is_bit_identical(setup):
    config, root = setup
    out = root / "killed"
    proc = _start(config, out)
    assert _wait_for(lambda: _has_checkpoint(out / "checkpoints"), proc, 0.05), "finished before a checkpoint"
    time.sleep(random.uniform(0.0, 1.5))  # a random moment after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()  # it really was cut short
    resumed = _run(config, out, "--resume")
    assert "resuming from" in resumed.stdout
    _assert_identical(root / "reference", out)


def test_sigkill_during_checkpoint_write_then_resume_is_bit_identical(setup):
    config, root = setup
    out = root / "killed-mid-write"
    proc = _start(config, out)
    # Kill the moment a checkpoint's temporary folder shows up (the writer is inside atomic_directory).
    caught = _wait_for(lambda: _writing(out / "checkpoints"), proc, 0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    if caught:  # usually: the write takes milliseconds, the poll a fraction of one
        half = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".step-")]
        assert half, "the kill landed inside the checkpoint write"
        assert not set(half) & {p for _, p in ckpt.list_checkpoints(out / "checkpoints")}
    print(f"killed during a checkpoint write: {caught}")
    resumed = _run(config, out, "--resume")
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".step-")]
    assert resumed.returncode == 0
    _assert_identical(root / "reference", out)


def test_corrupted_newest_checkpoint_falls_back_to_older(setup):
    config, root = setup
    out = root / "corrupted"
    proc = _start(config, out)
    assert _wait_for(lambda: len(ckpt.list_checkpoints(out / "checkpoints")) >= 2, proc, 0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    newest = ckpt.list_checkpoints(out / "checkpoints")[-1][1]
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: half-written data
    resumed = _run(config, out, "--resume")
    assert "skipping invalid checkpoint" in resumed.stdout
    _assert_identical(root / "reference", out)


def test_sigint_saves_checkpoint_and_exits_cleanly(setup):
    config, root = setup
    out = root / "interrupted"
    proc = _start(config, out)
    assert _wait_for(lambda: _has_checkpoint(out / "checkpoints"), proc, 0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "interrupted at step" in stdout and "--resume" in stdout
    step = int(stdout.split("interrupted at step ")[1].split(":")[0])
    path = out / "checkpoints" / ckpt.checkpoint_name(step)
    ckpt.verify_checkpoint(path)
    _run(config, out, "--resume")
    _assert_identical(root / "reference", out)
