"""Data parallel on CPU (gloo): `torchrun --nproc-per-node 2 -m qlorakit train`, checked against one process.

What each comparison may claim:
- 2 ranks x micro-batch b vs 1 process accumulating the same 2 micro-batches: the same rows, padded the
  same, through the same kernels, so bit for bit (adapter file bytes, logged losses); fp32 is pinned.
- with LoRA dropout > 0 there is no single-process CLI run to compare with: rank r seeds torch with
  `train.seed + r` (recipe._start_state) and draws each mask seed from that stream (lora/dropout.py), while
  one process draws every micro-batch's masks from one stream, and a batch of 2b draws one mask for a tensor
  of another shape. The genuine equivalence is 1 process running the real loop over the same micro-batches
  with each micro-batch's masks drawn from the stream of the rank that owns it (`_RankStreams`): bit for bit.
- 2 ranks x b vs 1 process x 2b: the batch of 2b is padded to its widest row and its sums are ordered
  differently, so only rounding-level agreement; the tolerance comes from the compute dtype (`_tolerance`).
  Tested in fp32 and in the machine's default dtype (bf16 on CPUs with native bf16).
Each of these fails when a rank skips the gradient all-reduce or both ranks read the same data shard
(shown by patching a copy of the package; the double-batch tolerance is > 1000x below those errors in
fp32 and > 6x in bf16, see `_tolerance`).
Resume works at the same world size and is refused at another.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.cli import adapter_tensors, cli_command, run_all, write_tiny_setup
from helpers.tinytrain import SINGLE
from qlorakit.config import load_config, replace
from qlorakit.data import build_datasets, collate
from qlorakit.lora.peft_format import save_adapter
from qlorakit.quant.linear import default_compute_dtype
from qlorakit.train.loop import CheckpointPlan, LoopState, train_loop
from qlorakit.train.metrics import MetricsWriter, read_records
from qlorakit.train.optim import build_optimizer, total_steps, trainable_named_parameters
from qlorakit.train.recipe import build_model, seed_everything

pytestmark = [pytest.mark.slow, pytest.mark.dtype_sensitive]
TIMEOUT = 900
LR, STEPS, WORLD = 1e-3, 6, 2
COMMON = (f"--train.lr={LR}", f"--train.max_steps={STEPS}", "--train.save_every=3", "--output.samples=0")
# Claims of (near-)exactness pin fp32: `auto` resolves to bf16 on CPUs with native bf16 (this one, or any
# CPU under QLORAKIT_CPU_BF16=1), where padding and summation order move results ~1e4x more.
FP32 = "--quant.compute_dtype=float32"
NO_DROPOUT = "--lora.dropout=0.0"
DROPOUT = "--lora.dropout=0.1"


def _torchrun_cmd(config: Path, *args: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD)]
    return cmd + cli_command(config, *args)[1:]  # `-m qlorakit train CONFIG ...`


# Run the commands at the same time (each single process uses one thread; torchrun runs go alone).
_run_all = functools.partial(run_all, timeout=TIMEOUT)


def _ok(*procs: subprocess.CompletedProcess) -> None:
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]


def _same_adapter_bytes(a: Path, b: Path) -> None:
    name = "adapter_model.safetensors"
    assert (a / name).read_bytes() == (b / name).read_bytes(), f"{a.name} and {b.name} adapters differ"


def _train(folder: Path, key: str) -> list[float]:
    return [r[key] for r in read_records(folder / "metrics.jsonl") if r["split"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    config = write_tiny_setup(root)
    two = [*COMMON, "--train.batch_size=2"]
    accum = [*COMMON, "--train.batch_size=2", f"--train.grad_accum={WORLD}"]
    one = [*COMMON, f"--train.batch_size={2 * WORLD}"]
    out = {name: root / name for name in ("two", "accum", "one", "two_drop", "two_auto", "one_auto")}
    _ok(*_run_all(_torchrun_cmd(config, *two, FP32, NO_DROPOUT, f"--output.dir={out['two']}")))
    _ok(*_run_all(_torchrun_cmd(config, *two, FP32, DROPOUT, f"--output.dir={out['two_drop']}")))
    singles = [
        cli_command(config, *accum, FP32, NO_DROPOUT, f"--output.dir={out['accum']}"),
        cli_command(config, *one, FP32, NO_DROPOUT, f"--output.dir={out['one']}"),
    ]
    auto = default_compute_dtype("cpu")  # what `compute_dtype: auto` resolves to in the subprocesses too
    if auto == torch.float32:  # the fp32 runs are the default-dtype runs
        out["two_auto"], out["one_auto"] = out["two"], out["one"]
    else:
        _ok(*_run_all(_torchrun_cmd(config, *two, NO_DROPOUT, f"--output.dir={out['two_auto']}")))
        singles.append(cli_command(config, *one, NO_DROPOUT, f"--output.dir={out['one_auto']}"))
    for pair in (singles[:2], singles[2:]):
        _ok(*_run_all(*pair))
    return config, root, out, auto


def test_two_ranks_equal_one_process_accumulating_the_same_micro_batches(runs):
    """Same micro-batches, same padding: DDP's mean of `world_size / tokens`-scaled rank gradients is the
    accumulated sum of `1 / tokens`-scaled ones exactly (the factor 2 is a power of two), so bit for bit."""
    _, _, out, _ = runs
    _same_adapter_bytes(out["two"], out["accum"])
    assert _train(out["two"], "loss") == _train(out["accum"], "loss")
    assert _train(out["two"], "grad_norm") == _train(out["accum"], "grad_norm")


class _RankStreams:
    """Forward hooks giving each training forward the torch RNG stream of the rank that owns its micro-batch.

    With `grad_accum = world_size`, micro-batch k of a step is the rows rank k reads (sampler.BatchOrder);
    rank r's stream starts as `recipe.seed_everything(seed + r)` leaves it and only its forwards draw from it
    (evaluation runs in eval mode, without dropout; gradient checkpointing replays a stashed state).
    """

    def __init__(self, seed: int, world_size: int) -> None:
        self.states = []
        for rank in range(world_size):
            seed_everything(seed + rank)
            self.states.append(torch.get_rng_state())
        self.forwards = 0

    def before(self, module, args, kwargs) -> None:
        if module.training:
            torch.set_rng_state(self.states[self.forwards % len(self.states)])

    def after(self, module, args, kwargs, output) -> None:
        if module.training:
            self.states[self.forwards % len(self.states)] = torch.get_rng_state()
            self.forwards += 1


def _one_process_with_rank_streams(config: Path, overrides: list[str], out: Path) -> int:
    """The pipeline of recipe._run (model, data, optimizer, the real `train_loop`) in this process, with
    `grad_accum = WORLD` micro-batches per step and `_RankStreams`; writes the adapter and metrics to
    `out`, returns the number of training forwards."""
    cfg = load_config(config, overrides)
    cfg = replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=WORLD * cfg.train.grad_accum))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.num_threads)  # the same kernels' blocking as the subprocess ranks
    try:
        model, tokenizer, _ = build_model(cfg, torch.float32, SINGLE)
        data = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
        optimizer = build_optimizer((p for _, p in trainable_named_parameters(model)), cfg.train)
        streams = _RankStreams(cfg.train.seed, WORLD)
        model.register_forward_pre_hook(streams.before, with_kwargs=True)
        model.register_forward_hook(streams.after, with_kwargs=True)
        metrics = MetricsWriter(out, active=True, tensorboard=False, resume_step=None)
        train_loop(
            model,
            optimizer,
            data.train,
            data.val,
            lambda rows: collate(rows, tokenizer.pad_token_id),
            cfg.train,
            total_steps=total_steps(cfg.train, len(data.train), 1),
            state=LoopState(),
            plan=CheckpointPlan(out / "checkpoints", cfg.train.save_every, cfg.train.keep_last),
            metrics=metrics,
            ctx=SINGLE,
        )
        metrics.close()
        save_adapter(model, out, cfg.lora, base_model_name_or_path=cfg.model.name)
    finally:
        torch.set_num_threads(threads)
    return streams.forwards


def test_two_ranks_with_dropout_equal_one_process_drawing_each_ranks_masks(runs):
    """LoRA dropout 0.1, fp32: the 2-rank run is bit for bit 1 process accumulating the same micro-batches
    with each rank's dropout masks (`_RankStreams`; why not a plain CLI run: see the module docstring)."""
    config, root, out, _ = runs
    oracle = root / "one_process_rank_streams"
    overrides = [*COMMON, "--train.batch_size=2", FP32, DROPOUT]
    assert _one_process_with_rank_streams(config, overrides, oracle) == STEPS * WORLD
    _same_adapter_bytes(out["two_drop"], oracle)
    assert _train(out["two_drop"], "loss") == _train(oracle, "loss")
    assert _train(out["two_drop"], "grad_norm") == _train(oracle, "grad_norm")
    # dropout really acted: without it the same run ends elsewhere
    assert (out["two_drop"] / "adapter_model.safetensors").read_bytes() != (
        out["two"] / "adapter_model.safetensors"
    ).read_bytes()


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of 2 ranks x b vs 1 process x 2b computing in `dtype` (same rows, same weights).

    The runs differ in the padded width of a batch (so in GEMM shapes and kernel blocking) and in the order
    of long sums. In fp32 that re-association moves an aggregate (a mean loss, a gradient norm, an L1 sum)
    by a few eps (measured: <= 2 eps, i.e. 2.4e-7); we allow 16 eps. A narrower compute dtype rounds each
    GEMM output once to it, and every compared quantity averages many of those outputs, so it moves by less
    than one unit roundoff (eps / 2) of that dtype (bf16: 3.9e-3; measured <= 2.4e-4).
    A real bug moves them much further (measured in fp32): both ranks on one shard shift the step-1 loss by
    2.4e-3 and the step-1 gradient norm by 0.10; a missing gradient all-reduce the step-1 gradient norm by
    0.055; either moves the adapter by 2.6e-2 (relative L1).
    """
    return 16 * torch.finfo(torch.float32).eps + torch.finfo(dtype).eps / 2


def _assert_double_batch_close(two: Path, one: Path, dtype: torch.dtype) -> None:
    """Losses of every step, the step-1 gradient norm and the adapter (relative L1) within `_tolerance`.

    Gradient norms are compared at step 1 only: from step 2 the weights differ by Adam's updates, which
    divide each gradient by its own RMS, so an element whose gradient is ~0 moves by up to +-lr either way
    and later norms drift by more than rounding; the adapter's L1 sum averages those few elements out.
    """
    tol = _tolerance(dtype)
    assert _train(two, "loss") == pytest.approx(_train(one, "loss"), rel=tol, abs=0)
    assert _train(two, "grad_norm")[0] == pytest.approx(_train(one, "grad_norm")[0], rel=tol, abs=0)
    a, b = adapter_tensors(one), adapter_tensors(two)
    assert set(a) == set(b) and a
    moved = sum(float((a[k].double() - b[k].double()).abs().sum()) for k in a)
    assert moved / sum(float(a[k].double().abs().sum()) for k in a) <= tol


def test_two_ranks_match_one_process_with_double_batch_in_fp32(runs):
    """2 ranks x micro-batch 2 vs 1 process x batch 4, fp32 pinned (the near-exact claim)."""
    _, _, out, _ = runs
    _assert_double_batch_close(out["two"], out["one"], torch.float32)
    # one set of outputs, written by rank 0 only
    assert [r["step"] for r in read_records(out["two"] / "metrics.jsonl") if r["split"] == "train"] == list(
        range(1, STEPS + 1)
    )
    assert (out["two"] / "adapter_config.json").is_file() and (out["two"] / "README.md").is_file()


def test_two_ranks_match_one_process_with_double_batch_in_the_default_dtype(runs):
    """The same comparison with `compute_dtype: auto` (bf16 on CPUs with native bf16), tolerance from it."""
    _, _, out, auto = runs
    _assert_double_batch_close(out["two_auto"], out["one_auto"], auto)


def test_resume_same_world_size_and_refuse_another(runs):
    config, root, out, _ = runs
    two, accum = root / "two_resumed", root / "accum_resumed"
    shutil.copytree(out["two"], two)  # resume copies: the other tests' runs stay as they ended
    shutil.copytree(out["accum"], accum)
    more = [*COMMON[:1], f"--train.max_steps={STEPS + 3}", *COMMON[2:], FP32, NO_DROPOUT, "--resume"]
    accum_args = ["--train.batch_size=2", f"--train.grad_accum={WORLD}"]
    (bad,) = _run_all(cli_command(config, *more, *accum_args, f"--output.dir={two}"))
    assert bad.returncode == 2
    assert "saved by 2 process(es), resumed with 1" in bad.stderr
    (resumed,) = _run_all(_torchrun_cmd(config, *more, "--train.batch_size=2", f"--output.dir={two}"))
    _ok(resumed)
    assert f"(step {STEPS})" in resumed.stdout and "resuming from" in resumed.stdout
    _ok(*_run_all(cli_command(config, *more, *accum_args, f"--output.dir={accum}")))
    _same_adapter_bytes(two, accum)
    assert _train(two, "loss") == _train(accum, "loss")
    assert [r["step"] for r in read_records(two / "metrics.jsonl") if r["split"] == "train"] == list(
        range(1, STEPS + 4)
    )
