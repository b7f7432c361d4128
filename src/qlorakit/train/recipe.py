"""The `train` pipeline: config -> model -> 4-bit base -> LoRA -> data -> loop -> adapter + summary.

Read `run_training` top to bottom: every stage is one call. Cheap checks (config, data files, resume
compatibility) run before the model is loaded, so mistakes fail in a second, not after a minute.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from qlorakit.config import Config, config_to_dict
from qlorakit.core.errors import CheckpointError, ConfigError
from qlorakit.core.outputs import OutputPlan, check_output, claim_folder
from qlorakit.data import (
    DataBundle,
    Example,
    build_datasets,
    check_datasets,
    collate,
    reference_answer,
)
from qlorakit.lora.inject import count_parameters, prepare_for_kbit_training
from qlorakit.methods import base_only, method_of_config
from qlorakit.models.decode import pad_token_id
from qlorakit.models.load import resolve_compute_dtype
from qlorakit.models.resolve import load_model
from qlorakit.train import checkpoint as ckpt
from qlorakit.train.artifacts import TRAIN_OUTPUTS, write_outputs
from qlorakit.train.distributed import (
    DistContext,
    barrier,
    setup_distributed,
    teardown_distributed,
    wrap_model,
)
from qlorakit.train.loop import (
    Batch,
    CheckpointPlan,
    LoopResult,
    LoopState,
    restore_rng,
    restore_training_state,
    train_loop,
)
from qlorakit.train.metrics import MetricsWriter, peak_rss_mib
from qlorakit.train.optim import build_optimizer, check_optimizer, total_steps, trainable_named_parameters
from qlorakit.train.report import HeldOutGeneration, RunSummary, format_console, same_answer
from qlorakit.train.samples import EvalSettings, HeldOutCheck, check_held_out, held_out_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class TrainOutcome:
    output_dir: Path
    stop_reason: str
    """`max_steps`, `early_stopping` or `signal` (interrupted; a checkpoint was saved)."""
    signal: int | None
    summary: RunSummary | None
    """None on ranks other than 0 and for an interrupted run."""


def _say(ctx: DistContext, text: str) -> None:
    if ctx.is_main:
        print(text, flush=True)


def run_settings(cfg: Config) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint (method, model, quantization, LoRA, data,
    seed)."""
    return {
        "method": cfg.method,
        "model": config_to_dict(cfg.model),
        "quant": config_to_dict(cfg.quant),
        "lora": config_to_dict(cfg.lora),
        "data": config_to_dict(cfg.data),
        "seed": cfg.train.seed,
        "train": {key: getattr(cfg.train, key) for key in ckpt.TRAIN_KEYS},  # compared with notes
    }


def check_output_dir(cfg: Config) -> OutputPlan:
    """output.dir under the output rule of `qlorakit.core.outputs`: new, empty, or a train folder (else
    output.overwrite), never an input's folder, writable; checked before the model is loaded."""
    inputs = [cfg.model.name, cfg.data.val_path, *(spec.path for spec in cfg.data.datasets)]
    return check_output(
        cfg.output.dir,
        command="train",
        mode="update",
        inputs=inputs,
        overwrite=cfg.output.overwrite,
        label="output.dir",
        switch="output.overwrite=true (or --overwrite)",
    )


def find_resume_checkpoint(cfg: Config, root: Path, world_size: int, notes: list[str]) -> Path | None:
    """The checkpoint to resume from (`train.resume`), checked for compatibility; None for a fresh run."""
    resume = cfg.train.resume
    if resume == "never":
        if ckpt.list_checkpoints(root):
            raise ConfigError(
                f"{root} holds checkpoints of an earlier run; pass --resume (train.resume=auto) to continue "
                "it, or choose a new output.dir (or delete that folder) to start over"
            )
        return None
    if resume == "auto":
        path = ckpt.latest_valid_checkpoint(root, notes)
        if path is None:
            notes.append(f"no valid checkpoint under {root}; starting a new run")
            return None
    else:
        path = Path(resume)
        ckpt.verify_checkpoint(path)
    saved = json.loads((path / "trainer_state.json").read_text())
    notes.extend(ckpt.check_compatible(saved["run"], run_settings(cfg), path))
    if saved["world_size"] != world_size:
        raise CheckpointError(
            f"{path}: saved by {saved['world_size']} process(es), resumed with {world_size}; resume with "
            f"torchrun --nproc-per-node {saved['world_size']} (the data order and RNG streams are per rank)"
        )
    return path


def build_model(
    cfg: Config, compute_dtype: torch.dtype, ctx: DistContext
) -> tuple[nn.Module, PreTrainedTokenizerBase, str]:
    """Load the base, quantize it to 4 bits (QLoRA) and inject the method's parameters (LoRA, ...);
    returns (model, tokenizer, report)."""
    model, tokenizer = load_model(
        cfg.model.name,
        dtype=compute_dtype,
        device="cpu",
        trust_remote_code=cfg.model.trust_remote_code,
        quantize=cfg.quant if cfg.quant.enabled else None,
    )
    prepare_for_kbit_training(model, gradient_checkpointing=cfg.train.gradient_checkpointing)
    report = method_of_config(cfg).inject(model, cfg, cfg.train.seed)
    model.to(ctx.device)
    return model, tokenizer, report


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _collate_fn(tokenizer: PreTrainedTokenizerBase) -> Callable[[Sequence[Example]], Batch]:
    pad = pad_token_id(tokenizer)
    return lambda examples: collate(examples, pad)


def run_training(cfg: Config) -> TrainOutcome:
    """Run the whole `train` pipeline (single process, or one rank under torchrun)."""
    ctx = setup_distributed()
    try:
        return _run(cfg, ctx)
    finally:
        teardown_distributed(ctx)


def _preflight(cfg: Config, ctx: DistContext) -> tuple[OutputPlan, Path | None]:
    """The cheap checks before the model is loaded: output folder, data files, optimizer, resume point."""
    notes: list[str] = []
    plan = check_output_dir(cfg)
    check_datasets(cfg.data)
    check_optimizer(cfg.train.optim)
    resume_from = find_resume_checkpoint(cfg, Path(cfg.output.dir) / "checkpoints", ctx.world_size, notes)
    for note in notes:
        _say(ctx, f"note: {note}")
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    return plan, resume_from


def _run(cfg: Config, ctx: DistContext) -> TrainOutcome:
    started = time.perf_counter()
    out = Path(cfg.output.dir)
    plan, resume_from = _preflight(cfg, ctx)
    compute_dtype = resolve_compute_dtype(cfg.quant.compute_dtype, ctx.device)
    autocast_dtype = compute_dtype if compute_dtype != torch.float32 else None
    model, tokenizer, inject_report = build_model(cfg, compute_dtype, ctx)
    params = count_parameters(model)  # before DDP wraps it; the same for every method
    data = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    _say(ctx, f"model: {cfg.model.name}; {inject_report}\n{data.stats.summary()}")
    collate_fn = _collate_fn(tokenizer)
    settings = EvalSettings(cfg.train.batch_size, cfg.train.eval_batches, autocast_dtype)
    with base_only(model):
        before = check_held_out(model, tokenizer, data, cfg, ctx, collate_fn, settings)
    steps = total_steps(cfg.train, len(data.train), ctx.world_size)
    result, records = _train(cfg, ctx, model, data, collate_fn, plan, resume_from, steps, autocast_dtype)
    if result.stop_reason == "signal":
        _say(
            ctx,
            f"interrupted at step {result.state.step}: checkpoint saved in "
            f"{result.checkpoint or out / 'checkpoints'}; run the same command with --resume to continue",
        )
        return TrainOutcome(out, result.stop_reason, result.signal, None)
    after = check_held_out(model, tokenizer, data, cfg, ctx, collate_fn, settings)
    summary = None
    if ctx.is_main:
        summary = _summary(cfg, ctx, data, result, before, after, (inject_report, params), steps, started)
        summary = write_outputs(cfg, model, tokenizer, result.state, records, summary)
        print(format_console(summary), flush=True)
    barrier(ctx)
    return TrainOutcome(out, result.stop_reason, None, summary)


def _train(
    cfg: Config,
    ctx: DistContext,
    model: nn.Module,
    data: DataBundle,
    collate_fn: Callable[[Sequence[Example]], Batch],
    plan: OutputPlan,
    resume_from: Path | None,
    steps: int,
    autocast_dtype: torch.dtype | None,
) -> tuple[LoopResult, list[dict[str, Any]]]:
    """Optimizer, start (or resumed) state, metrics and the loop; returns its result and the metric records."""
    root = Path(cfg.output.dir) / "checkpoints"
    optimizer = build_optimizer((p for _, p in trainable_named_parameters(model)), cfg.train)
    state, loaded = _start_state(resume_from, model, optimizer, cfg, ctx)
    if ctx.is_main:
        claim_folder(plan, TRAIN_OUTPUTS)  # from here on the folder is this run's (and its resumes')
    metrics = MetricsWriter(
        Path(cfg.output.dir),
        active=ctx.is_main,
        tensorboard=cfg.output.tensorboard,
        resume_step=state.step if loaded else None,
    )
    try:
        result = train_loop(
            wrap_model(model, ctx),
            optimizer,
            data.train,
            data.val,
            collate_fn,
            cfg.train,
            total_steps=steps,
            state=state,
            plan=CheckpointPlan(root, cfg.train.save_every, cfg.train.keep_last, run_settings(cfg)),
            metrics=metrics,
            ctx=ctx,
            autocast_dtype=autocast_dtype,
        )
    finally:
        metrics.close()
    return result, metrics.records()


def _start_state(
    resume_from: Path | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    ctx: DistContext,
) -> tuple[LoopState, ckpt.LoadedCheckpoint | None]:
    """A fresh state with seeded RNGs, or the checkpoint's state with its weights, optimizer and RNGs."""
    root = Path(cfg.output.dir) / "checkpoints"
    if ctx.is_main:
        for stale in ckpt.remove_stale_temporaries(root):
            _say(ctx, f"note: removed the unfinished checkpoint folder {stale}")
    if resume_from is None:
        seed_everything(cfg.train.seed + ctx.rank)  # ranks draw different dropout masks
        return LoopState(), None
    loaded = ckpt.load_checkpoint(resume_from, [n for n, _ in trainable_named_parameters(model)])
    state = restore_training_state(loaded, model, optimizer, ctx)
    restore_rng(loaded, ctx)  # last: nothing may draw random numbers between here and the loop
    _say(ctx, f"resuming from {resume_from} (step {state.step})")
    return state, loaded


def _quantization_text(cfg: Config) -> str:
    q = cfg.quant
    if not q.enabled:
        return "16-bit (no quantization)"
    return f"{q.quant_type} 4-bit, blocksize {q.blocksize}, double quant {q.double_quant}"


def _summary(
    cfg: Config,
    ctx: DistContext,
    data: DataBundle,
    result: LoopResult,
    before: HeldOutCheck,
    after: HeldOutCheck,
    injected: tuple[str, tuple[int, int]],
    steps: int,
    started: float,
) -> RunSummary:
    """The run's summary; `injected` is (the method's inject report, (trainable, total) parameters)."""
    inject_report, (trainable, total) = injected
    records = held_out_records(data.val_records, cfg.output.samples)
    gens = tuple(
        HeldOutGeneration(
            prompt=r.messages[-2].content if r.messages and len(r.messages) > 1 else r.source,
            reference=reference_answer(r),
            before=b,
            after=a,
        )
        for r, b, a in zip(records, before.texts, after.texts, strict=True)
    )
    st = result.state
    return RunSummary(
        output_dir=str(cfg.output.dir),
        base_model=cfg.model.name,
        quantization=_quantization_text(cfg),
        lora_r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        trainable=inject_report,
        data_summary=data.stats.summary().splitlines()[-1],
        steps=st.step,
        total_steps=steps,
        stop_reason=result.stop_reason,
        epochs=st.position / max(1, len(data.train)),
        world_size=ctx.world_size,
        final_train_loss=st.last_train_loss,
        val_loss_before=before.loss,
        val_loss_after=after.loss,
        best_val_loss=st.best_val_loss,
        best_step=st.best_step,
        samples=len(records),
        exact_before=sum(same_answer(g.before, g.reference) for g in gens),
        exact_after=sum(same_answer(g.after, g.reference) for g in gens),
        generations=gens,
        wall_time_s=time.perf_counter() - started,
        train_time_s=st.train_time_s,
        tokens_per_s=st.tokens / max(st.train_time_s, 1e-9),
        peak_rss_mib=peak_rss_mib(),
        trainable_params=trainable,
        total_params=total,
    )
