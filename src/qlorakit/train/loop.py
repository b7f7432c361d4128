"""The training loop: one function, `train_loop`, readable top to bottom; helpers do one thing each.

One optimizer step = `grad_accum` micro-batches per rank. The loss is the summed token cross-entropy
divided by the number of label tokens in the whole step (all micro-batches, all ranks), so accumulating
k micro-batches of size b, or running k ranks, computes the gradient of one batch of k * b examples.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlorakit.config import TrainConfig
from qlorakit.core.errors import CheckpointError, TrainingDivergedError
from qlorakit.data import Example
from qlorakit.loss import causal_lm_loss_sum, scored_tokens
from qlorakit.models.load import unwrap_model
from qlorakit.train import checkpoint as ckpt
from qlorakit.train.distributed import (
    DistContext,
    all_reduce_max_flag,
    all_reduce_sum,
    barrier,
    gather_bytes,
)
from qlorakit.train.metrics import MetricsWriter, ThroughputWindow, progress_bar
from qlorakit.train.optim import lr_at, set_lr, trainable_named_parameters
from qlorakit.train.sampler import BatchOrder

Batch = dict[str, torch.Tensor]


@dataclass
class LoopState:
    """Everything besides weights, optimizer and RNG that a resumed run needs (saved as JSON)."""

    step: int = 0
    position: int = 0
    """Examples consumed from the training stream, summed over ranks (see sampler.BatchOrder)."""
    tokens: int = 0
    train_time_s: float = 0.0
    last_train_loss: float | None = None
    last_val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0


@dataclass
class LoopResult:
    state: LoopState
    stop_reason: str
    """`max_steps`, `early_stopping` or `signal`."""
    signal: int | None = None
    checkpoint: Path | None = None


@dataclass(frozen=True)
class CheckpointPlan:
    root: Path
    every: int
    keep_last: int
    run_settings: dict[str, Any] = field(default_factory=dict)
    """Settings a resume must match (saved in trainer_state.json, compared by checkpoint.check_compatible)."""


# ---------------------------------------------------------------------------------------------------------
# Single-concern helpers.


def count_input_tokens(batch: Batch) -> int:
    """Input tokens of a batch, for tokens/s. Packed batches carry a [B, 1, T, T] float mask instead of a
    [B, T] one; their rows are filled up to max_length, so every position is counted (the trailing
    padding of a last, partly filled row included)."""
    mask = batch["attention_mask"]
    return int(mask.sum()) if mask.dim() == 2 else batch["input_ids"].numel()


def count_label_tokens(batch: Batch) -> int:
    """Label tokens that contribute to the loss (after the next-token shift)."""
    return scored_tokens(batch["labels"])


def batch_loss_sum(
    model: nn.Module, batch: Batch, device: torch.device, autocast_dtype: torch.dtype | None
) -> torch.Tensor:
    """Summed next-token loss of one batch (see qlorakit.loss.causal_lm_loss_sum) -> [] fp32."""
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        return causal_lm_loss_sum(model, inputs, batch["labels"].to(device))


def accumulate_gradients(
    model: nn.Module, batches: Sequence[Batch], ctx: DistContext, autocast_dtype: torch.dtype | None
) -> tuple[float, int, int]:
    """Forward/backward over this rank's micro-batches; returns (mean loss, label tokens, input tokens).

    Gradients end up as d(sum of token losses over all ranks / all label tokens); DDP divides by the
    world size when averaging, which the `world_size` factor undoes.
    """
    local = torch.tensor(
        [sum(count_label_tokens(b) for b in batches), sum(count_input_tokens(b) for b in batches)],
        dtype=torch.int64,
    )
    label_tokens, input_tokens = (int(v) for v in all_reduce_sum(local, ctx))
    scale = ctx.world_size / max(1, label_tokens)
    total = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or not ctx.distributed else model.no_sync()
        with sync:
            loss_sum = batch_loss_sum(model, batch, ctx.device, autocast_dtype)
            (loss_sum * scale).backward()
        total += loss_sum.detach().double().cpu()
    loss = float(all_reduce_sum(total, ctx)) / max(1, label_tokens)
    return loss, label_tokens, input_tokens


def clip_gradients(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Clip to `max_norm` (None: no clipping); returns the total L2 norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
    return float(norm)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    examples: Sequence[Example],
    collate_fn: Callable[[Sequence[Example]], Batch],
    *,
    batch_size: int,
    max_batches: int | None,
    ctx: DistContext,
    autocast_dtype: torch.dtype | None,
) -> float | None:
    """Mean token loss over `examples` (in order; batches split over ranks); None without examples."""
    if not examples:
        return None
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    starts = list(range(0, len(examples), batch_size))[:max_batches]
    totals = torch.zeros(2, dtype=torch.float64)
    for k in range(ctx.rank, len(starts), ctx.world_size):
        batch = collate_fn(examples[starts[k] : starts[k] + batch_size])
        totals[0] += float(batch_loss_sum(net, batch, ctx.device, autocast_dtype))
        totals[1] += count_label_tokens(batch)
    net.train(was_training)
    loss_sum, tokens = all_reduce_sum(totals, ctx).tolist()
    return loss_sum / tokens if tokens else None


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second SIGINT aborts)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: signals stay as they were
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def save_training_state(
    plan: CheckpointPlan,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    ctx: DistContext,
) -> Path | None:
    """Checkpoint on rank 0 (every rank contributes its RNG state); prunes old checkpoints."""
    rng_states = gather_bytes(ckpt.capture_rng_state(), ctx)
    path = None
    if ctx.is_main:
        named = trainable_named_parameters(unwrap_model(model))
        trainer_state = {**asdict(state), "world_size": ctx.world_size, "run": plan.run_settings}
        path = ckpt.save_checkpoint(
            plan.root,
            state.step,
            trainable={name: p.detach() for name, p in named},
            optimizer_state=optimizer.state_dict(),
            param_names=[name for name, _ in named],
            rng_states=rng_states,
            trainer_state=trainer_state,
        )
        keep = {state.best_step} if state.best_step is not None else set()
        ckpt.prune_checkpoints(plan.root, plan.keep_last, keep)
    barrier(ctx)
    return path


def restore_training_state(
    loaded: ckpt.LoadedCheckpoint, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext
) -> LoopState:
    """Load weights and optimizer state from a checkpoint; returns its LoopState.

    RNG states are restored separately (`restore_rng`) right before the loop, after any evaluation.
    """
    saved_world = loaded.trainer_state["world_size"]
    if saved_world != ctx.world_size or len(loaded.rng_states) != ctx.world_size:
        raise CheckpointError(
            f"{loaded.path}: saved by {saved_world} process(es), resumed with {ctx.world_size}; "
            f"resume with torchrun --nproc-per-node {saved_world} (the data order and RNG streams are per rank)"
        )
    named = dict(trainable_named_parameters(unwrap_model(model)))
    if set(named) != set(loaded.trainable):
        missing = sorted(set(named) - set(loaded.trainable))[:3]
        extra = sorted(set(loaded.trainable) - set(named))[:3]
        raise CheckpointError(
            f"{loaded.path}: trainable weights differ (missing {missing}, unexpected {extra})"
        )
    with torch.no_grad():
        for name, param in named.items():
            value = loaded.trainable[name]
            if value.shape != param.shape:
                raise CheckpointError(
                    f"{loaded.path}: {name} has shape {list(value.shape)}, the model {list(param.shape)}"
                )
            param.copy_(value.to(param.dtype))
    optimizer.load_state_dict(loaded.optimizer_state)
    fields = set(LoopState.__dataclass_fields__)
    return LoopState(**{k: v for k, v in loaded.trainer_state.items() if k in fields})


def restore_rng(loaded: ckpt.LoadedCheckpoint, ctx: DistContext) -> None:
    """This rank's RNG states from the checkpoint (dropout masks continue exactly)."""
    ckpt.restore_rng_state(loaded.rng_states[ctx.rank])


def _diverged(
    step: int, loss: float, grad_norm: float, lr: float, plan: CheckpointPlan
) -> TrainingDivergedError:
    last = ckpt.latest_valid_checkpoint(plan.root)
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
    return TrainingDivergedError(
        f"step {step}: the loss is {loss} and the gradient norm {grad_norm} (lr {lr:.3g}); training stopped "
        f"before this update, {where}. Lower train.lr, set train.max_grad_norm, or check this batch's rows"
    )


def _update_best(state: LoopState, val_loss: float | None) -> bool:
    """Record an evaluation; True when it is a new best."""
    state.last_val_loss = val_loss
    if val_loss is None:
        return False
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step, state.evals_since_best = val_loss, state.step, 0
        return True
    state.evals_since_best += 1
    return False


def _micro_batches(
    examples: Sequence[Example],
    order: BatchOrder,
    collate_fn: Callable,
    position: int,
    cfg: TrainConfig,
    ctx: DistContext,
) -> list[Batch]:
    """This rank's `grad_accum` micro-batches of the optimizer step starting at stream `position`."""
    per_micro = cfg.batch_size * ctx.world_size
    return [
        collate_fn(
            [examples[i] for i in order.micro_batch(position + k * per_micro, cfg.batch_size, ctx.rank)]
        )
        for k in range(cfg.grad_accum)
    ]


def _optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    batches: list[Batch],
    total_steps: int,
    state: LoopState,
    cfg: TrainConfig,
    plan: CheckpointPlan,
    ctx: DistContext,
    autocast_dtype: torch.dtype | None,
) -> tuple[float, float, int, float, float]:
    """One optimizer step over this rank's micro-batches, advancing `state`; (lr, loss, tokens, seconds,
    grad norm). TrainingDivergedError before the update when the loss or the gradient is not finite."""
    lr = lr_at(
        state.step,
        base_lr=cfg.lr,
        schedule=cfg.schedule,
        warmup_steps=cfg.warmup_steps,
        total_steps=total_steps,
    )
    set_lr(optimizer, lr)
    started = time.perf_counter()
    loss, _, tokens = accumulate_gradients(model, batches, ctx, autocast_dtype)
    grad_norm = clip_gradients(params, cfg.max_grad_norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # stop before the update touches weights
        raise _diverged(state.step + 1, loss, grad_norm, lr, plan)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    state.step += 1
    state.position += cfg.batch_size * ctx.world_size * cfg.grad_accum
    state.tokens += tokens
    state.train_time_s += seconds
    state.last_train_loss = loss
    return lr, loss, tokens, seconds, grad_norm


# ---------------------------------------------------------------------------------------------------------
# The loop.


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    collate_fn: Callable[[Sequence[Example]], Batch],
    cfg: TrainConfig,
    *,
    total_steps: int,
    state: LoopState,
    plan: CheckpointPlan,
    metrics: MetricsWriter,
    ctx: DistContext,
    autocast_dtype: torch.dtype | None = None,
) -> LoopResult:
    """Train from `state` (fresh or restored) to `total_steps`, early stopping, or a stop signal."""
    order = BatchOrder(len(train_examples), cfg.seed)
    params = [p for _, p in trainable_named_parameters(unwrap_model(model))]
    evaluate = dict(
        batch_size=cfg.batch_size, max_batches=cfg.eval_batches, ctx=ctx, autocast_dtype=autocast_dtype
    )
    bar, window = progress_bar(total_steps, state.step, ctx.is_main), ThroughputWindow()
    reason, saved = "max_steps", None
    model.train()
    with StopRequest() as stop:
        while state.step < total_steps:
            batches = _micro_batches(train_examples, order, collate_fn, state.position, cfg, ctx)
            lr, loss, tokens, seconds, grad_norm = _optimizer_step(
                model, optimizer, params, batches, total_steps, state, cfg, plan, ctx, autocast_dtype
            )
            window.add(loss, tokens, seconds)
            bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{window.tokens_per_s:.0f}", refresh=False
            )
            bar.update(1)
            last, epoch = state.step == total_steps, order.epoch(state.position)
            if state.step % cfg.log_every == 0 or last:
                metrics.log(window.record(state.step, state.tokens, state.train_time_s, epoch, lr, grad_norm))
            new_best = False
            if state.step % cfg.eval_every == 0 or last:
                val = evaluate_loss(model, val_examples, collate_fn, **evaluate)
                new_best = _update_best(state, val)
                if val is not None:
                    metrics.log({"step": state.step, "split": "val", "epoch": epoch, "loss": val,
                                 "elapsed_s": state.train_time_s})  # fmt: skip
                    bar.write(f"step {state.step}: val loss {val:.4f}" + (" (best)" if new_best else ""))
            patience = cfg.early_stopping_patience
            if patience is not None and state.evals_since_best >= patience:
                reason = "early_stopping"
            if all_reduce_max_flag(stop.signum is not None, ctx):  # every rank stops at the same step
                reason = "signal"
            if state.step % plan.every == 0 or new_best or last or reason != "max_steps":
                saved = save_training_state(plan, model, optimizer, state, ctx)
            if reason != "max_steps":
                break
    bar.close()
    return LoopResult(state, reason, stop.signum, saved)
