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
# Two ranks sum their gradients in another order than one process does, and their batches are padded to
# different widths; a few Adam steps keep those float32 rounding differences at the 1e-5 level.
RTOL, ATOL = 1e-4, 1e-5


def _torchrun(config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += cli_command(config, *args)[1:]  # `-m qlorakit train CONFIG ...`
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _single(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(config, *args), env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _close(a: Path, b: Path) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert set(ta) == set(tb) and ta
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=RTOL, atol=ATOL, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    config = write_tiny_setup(root, quant=False)
    common = ["--lora.dropout=0.0", "--train.max_steps=6", "--train.save_every=3", "--train.eval_every=3"]
    one = _single(config, *common, "--train.batch_size=4", f"--output.dir={root / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(config, *common, "--train.batch_size=2", f"--output.dir={root / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    return config, root, common


def test_two_ranks_match_one_process_with_double_batch(runs):
    config, root, _ = runs
    _close(root / "one", root / "two")
    # one set of outputs, written by rank 0 only
    train = [r for r in read_records(root / "two" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    one = [r for r in read_records(root / "one" / "metrics.jsonl") if r["split"] == "train"]
    for a, b in zip(one, train, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["tokens"] == b["tokens"]


def test_resume_same_world_size_and_refuse_another(runs):
    config, root, common = runs
    more = [*common[:1], "--train.max_steps=9", *common[2:], "--resume"]
    bad = _single(config, *more, "--train.batch_size=4", f"--output.dir={root / 'two'}")
    assert bad.returncode == 2
    assert "saved by 2 process(es), resumed with 1" in bad.stderr
    two = _torchrun(config, *more, "--train.batch_size=2", f"--output.dir={root / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "resuming from" in two.stdout
    one = _single(config, *more, "--train.batch_size=4", f"--output.dir={root / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    _close(root / "one", root / "two")
