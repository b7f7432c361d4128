"""Every benchmark still runs against the current package (`--quick`: tiny sizes, no timing is asserted).

Benchmarks import qlorakit's internals and run workers in subprocesses, so a renamed function or a moved
module breaks them without breaking any other test (a restructure once left `bench_train.py`'s worker
calling `load_quantizing` with an old signature). These runs catch that; they assert that each benchmark
finished and printed its result lines, never how fast anything was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, timeout: int = 900) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=BENCH.parent,
    )
    assert proc.returncode == 0, (
        f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


@pytest.mark.slow
def test_bench_train_runs_and_losses_agree() -> None:
    # qlorakit against a peer the test extra installs (torchao is a benchmark-only dependency), in fp32
    # only and without checkpointing: forced bf16 is emulated on many CPUs (minutes per worker there)
    args = ("--rounds", "1", "--methods", "qlorakit", "peft_bnb", "--dtype", "fp32", "--ckpt", "off")
    out = _run("bench_train.py", *args, "--loss-steps", "2")
    assert "FAILED" not in out
    assert "step-1 loss, fp32:" in out and ": ok" in out  # every worker's step-1 loss agrees
    assert "headline: qlorakit default" in out


@pytest.mark.slow
def test_bench_quant_runs() -> None:
    out = _run("bench_quant.py", "--repeats", "2", "--linear-repeats", "1")
    assert "bitsandbytes" in out and "Linear4bit" in out


@pytest.mark.slow
def test_bench_lora_runs() -> None:
    out = _run("bench_lora.py", "--repeats", "2")
    assert "LoRA" in out


@pytest.mark.slow
def test_bench_estimate_runs() -> None:
    out = _run("bench_estimate.py")
    assert "MiB" in out or "GiB" in out
