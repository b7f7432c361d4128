"""Data parallel on CPU (gloo): `torchrun --nproc-per-node 2 -m qlorakit train` with micro-batch b matches
one process with batch 2b (same seed and steps, dropout 0), resume works at the same world size and is
refused at another."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tinytrain import adapter_tensors, cli_command, cli_env, write_tiny_setup

from qlorakit.train.metrics import read_records

pytestmark = pytest.mark.slow
TIMEOUT = 900
LR, STEPS = 1e-3, 6


def _torchrun(config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += cli_command(config, *args)[1:]  # `-m qlorakit train CONFIG ...`
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _single(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(config, *args), env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT
    )


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _identical(a: Path, b: Path) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert set(ta) == set(tb) and ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def _train_losses(folder: Path) -> list[float]:
    return [r["loss"] for r in read_records(folder / "metrics.jsonl") if r["split"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    config = write_tiny_setup(root)
    common = ["--lora.dropout=0.0", f"--train.lr={LR}", f"--train.max_steps={STEPS}", "--train.save_every=3"]
    _ok(_torchrun(config, *common, "--train.batch_size=2", f"--output.dir={root / 'two'}"))
    _ok(
        _single(
            config, *common, "--train.batch_size=2", "--train.grad_accum=2", f"--output.dir={root / 'accum'}"
        )
    )
    _ok(_single(config, *common, "--train.batch_size=4", f"--output.dir={root / 'one'}"))
    return config, root, common


def test_two_ranks_equal_one_process_accumulating_the_same_micro_batches(runs):
    """Same micro-batches, same padding: the all-reduced gradient is bit-identical to accumulation."""
    _, root, _ = runs
    _identical(root / "two", root / "accum")
    assert _train_losses(root / "two") == _train_losses(root / "accum")


def test_two_ranks_match_one_process_with_double_batch(runs):
    """2 ranks x micro-batch 2 vs 1 process x batch 4.

    Tolerance: one batch of 4 is padded to the widest of 4 rows and summed in another order, so gradients
    differ in the last float32 bits. Adam divides each gradient by its own RMS, so an element whose true
    gradient is ~0 can take an update of up to +-lr either way: we require the losses to agree to 1e-4
    (relative), 98% of the adapter elements to agree to 1e-5, and every element within 2 * lr * steps.
    """
    _, root, _ = runs
    a, b = adapter_tensors(root / "one"), adapter_tensors(root / "two")
    assert set(a) == set(b) and a
    close = sum(int(((a[k] - b[k]).abs() <= 1e-5).sum()) for k in a)
    total = sum(a[k].numel() for k in a)
    assert close / total >= 0.98
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2 * LR * STEPS, msg=key)
    moved = sum(float(a[k].float().sub(b[k]).abs().sum()) for k in a) / sum(
        float(a[k].abs().sum()) for k in a
    )
    assert moved < 0.02
    assert _train_losses(root / "one") == pytest.approx(_train_losses(root / "two"), rel=1e-4)
    # one set of outputs, written by rank 0 only
    assert [r["step"] for r in read_records(root / "two" / "metrics.jsonl") if r["split"] == "train"] == list(
        range(1, STEPS + 1)
    )
    assert (root / "two" / "adapter_config.json").is_file() and (root / "two" / "README.md").is_file()


def test_resume_same_world_size_and_refuse_another(runs):
    config, root, common = runs
    more = [*common[:2], f"--train.max_steps={STEPS + 3}", *common[3:], "--resume"]
    bad = _single(
        config, *more, "--train.batch_size=2", "--train.grad_accum=2", f"--output.dir={root / 'two'}"
    )
    assert bad.returncode == 2
    assert "saved by 2 process(es), resumed with 1" in bad.stderr
    two = _ok(_torchrun(config, *more, "--train.batch_size=2", f"--output.dir={root / 'two'}"))
    assert "resuming from" in two.stdout
    _ok(
        _single(
            config, *more, "--train.batch_size=2", "--train.grad_accum=2", f"--output.dir={root / 'accum'}"
        )
    )
    _identical(root / "two", root / "accum")
