"""The `train` pipeline: config -> model -> 4-bit base -> LoRA -> data -> loop -> adapter + summary.

Read `run_training` top to bottom: every stage is one call. Cheap checks (config, data files, resume
compatibility) run before the model is loaded, so mistakes fail in a second, not after a minute.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qlorakit.config import Config, config_to_dict
from qlorakit.core.atomic import atomic_write_json, atomic_write_text, make_temp_dir
from qlorakit.core.errors import CheckpointError, ConfigError
from qlorakit.core.outputs import OutputPlan, add_own_names, check_output, claim_folder
from qlorakit.data import (
    DataBundle,
    Record,
    build_datasets,
    check_datasets,
    collate,
    prompt_ids,
    reference_answer,
)
from qlorakit.lora.inject import disable_adapters, inject_lora, prepare_for_kbit_training
from qlorakit.lora.peft_format import save_adapter
from qlorakit.models.decode import generate_greedy_batch, pad_token_id
from qlorakit.models.load import resolve_compute_dtype
from qlorakit.models.resolve import load_model
from qlorakit.train import checkpoint as ckpt
from qlorakit.train.distributed import (
    DistContext,
    barrier,
    setup_distributed,
    teardown_distributed,
    wrap_model,
)
from qlorakit.train.loop import (
    CheckpointPlan,
    LoopState,
    evaluate_loss,
    restore_rng,
    restore_training_state,
    train_loop,
)
from qlorakit.train.metrics import (
    CSV,
    JSONL,
    PLOT,
    MetricsWriter,
    exact_match_text,
    peak_rss_mib,
    plot_loss_curve,
    render_summary,
)
from qlorakit.train.optim import build_optimizer, check_optimizer, total_steps, trainable_named_parameters


@dataclass
class TrainOutcome:
    output_dir: Path
    stop_reason: str
    """`max_steps`, `early_stopping` or `signal` (interrupted; a checkpoint was saved)."""
    signal: int | None
    summary: dict[str, Any]


def _say(ctx: DistContext, text: str) -> None:
    if ctx.is_main:
        print(text, flush=True)


def run_settings(cfg: Config) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint (model, quantization, LoRA, data, seed)."""
    return {
        "model": config_to_dict(cfg.model),
        "quant": config_to_dict(cfg.quant),
        "lora": config_to_dict(cfg.lora),
        "data": config_to_dict(cfg.data),
        "seed": cfg.train.seed,
        "train": {key: getattr(cfg.train, key) for key in ckpt.TRAIN_KEYS},  # compared with notes
    }


TRAIN_OUTPUTS = (
    "adapter_config.json", "adapter_model.safetensors", "config.yaml", "README.md", "summary.json", JSONL, CSV,
    PLOT, "checkpoints", "best", "tensorboard",
)  # fmt: skip
"""What train writes into output.dir (besides the tokenizer files), recorded in its output marker."""


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


def build_model(cfg: Config, compute_dtype: torch.dtype, ctx: DistContext) -> tuple[nn.Module, Any, str]:
    """Load the base, quantize it to 4 bits (QLoRA) and inject LoRA; returns (model, tokenizer, report)."""
    model, tokenizer = load_model(
        cfg.model.name,
        dtype=compute_dtype,
        device="cpu",
        trust_remote_code=cfg.model.trust_remote_code,
        quantize=cfg.quant if cfg.quant.enabled else None,
    )
    prepare_for_kbit_training(model, gradient_checkpointing=cfg.train.gradient_checkpointing)
    report = inject_lora(model, cfg.lora, seed=cfg.train.seed)
    model.to(ctx.device)
    return model, tokenizer, str(report)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


#: Held-out prompts decoded together: one pass over the 4-bit weights per token serves this many rows.
SAMPLE_BATCH = 8


def generate_samples(model: nn.Module, tokenizer: Any, records: list[Record], template: str) -> list[str]:
    """Greedy completions of each held-out record's prompt (budget: reference length + 8 tokens)."""
    prompts = [prompt_ids(r, tokenizer, template) for r in records]
    budgets = [
        len(tokenizer(reference_answer(r), add_special_tokens=False)["input_ids"]) + 8 for r in records
    ]
    out = []
    for k in range(0, len(records), SAMPLE_BATCH):
        rows = generate_greedy_batch(
            model, tokenizer, prompts[k : k + SAMPLE_BATCH], budgets[k : k + SAMPLE_BATCH]
        )
        out += [tokenizer.decode(new, skip_special_tokens=True).strip() for new in rows]
    return out


def held_out_records(records: list[Record], n: int) -> list[Record]:
    return [r for r in records if reference_answer(r) is not None][:n]


def save_tokenizer(tokenizer: Any, out: Path) -> list[str]:
    """Tokenizer files into `out`, each renamed into place (no half-written file is ever visible) and
    listed in train's output marker; returns their names."""
    tmp = make_temp_dir(out, "tokenizer")
    try:
        tokenizer.save_pretrained(tmp)
        names = sorted(file.name for file in tmp.iterdir())
        for file in tmp.iterdir():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(file, out / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    add_own_names(out, "train", names)
    return names


def _save_best_adapter(model: nn.Module, cfg: Config, state: LoopState, root: Path, out: Path) -> Path | None:
    """When the best validation step is not the last one, also write its adapter to `<out>/best/`."""
    if state.best_step is None or state.best_step == state.step:
        return None
    path = root / ckpt.checkpoint_name(state.best_step)
    ckpt.verify_checkpoint(path)
    from safetensors.torch import load_file

    best = load_file(path / "trainable.safetensors")
    params = dict(trainable_named_parameters(model))
    final = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(best[name])
        target = save_adapter(model, out / "best", cfg.lora, base_model_name_or_path=cfg.model.name)
        for name, p in params.items():
            p.copy_(final[name])
    return target


def _compare(
    model: nn.Module, tokenizer: Any, data: DataBundle, cfg: Config, ctx: DistContext, eval_kw: dict
) -> dict:
    """Validation loss (all ranks) and greedy generations on held-out rows (rank 0)."""
    loss = evaluate_loss(model, data.val, _collate_fn(tokenizer), **eval_kw, ctx=ctx)
    texts: list[str] = []
    if ctx.is_main:
        with torch.random.fork_rng(devices=[]):  # generation must not move the training RNG streams
            texts = generate_samples(
                model, tokenizer, held_out_records(data.val_records, cfg.output.samples), cfg.data.template
            )
    barrier(ctx)
    return {"loss": loss, "texts": texts}


def _collate_fn(tokenizer: Any) -> Any:
    pad = pad_token_id(tokenizer)
    return lambda examples: collate(examples, pad)


def run_training(cfg: Config) -> TrainOutcome:
    """Run the whole `train` pipeline (single process, or one rank under torchrun)."""
    ctx = setup_distributed()
    try:
        return _run(cfg, ctx)
    finally:
        teardown_distributed(ctx)


def _run(cfg: Config, ctx: DistContext) -> TrainOutcome:
    started = time.perf_counter()
    out, notes = Path(cfg.output.dir), []
    root = out / "checkpoints"
    plan = check_output_dir(cfg)
    check_datasets(cfg.data)
    check_optimizer(cfg.train.optim)
    resume_from = find_resume_checkpoint(cfg, root, ctx.world_size, notes)
    for note in notes:
        _say(ctx, f"note: {note}")
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    compute_dtype = resolve_compute_dtype(cfg.quant.compute_dtype, ctx.device)
    autocast_dtype = compute_dtype if compute_dtype != torch.float32 else None
    model, tokenizer, inject_report = build_model(cfg, compute_dtype, ctx)
    data = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    _say(ctx, f"model: {cfg.model.name}; {inject_report}\n{data.stats.summary()}")
    eval_kw = dict(
        batch_size=cfg.train.batch_size, max_batches=cfg.train.eval_batches, autocast_dtype=autocast_dtype
    )
    with disable_adapters(model):
        before = _compare(model, tokenizer, data, cfg, ctx, eval_kw)
    optimizer = build_optimizer((p for _, p in trainable_named_parameters(model)), cfg.train)
    state, loaded = _start_state(resume_from, model, optimizer, cfg, ctx)
    steps = total_steps(cfg.train, len(data.train), ctx.world_size)
    if ctx.is_main:
        claim_folder(plan, TRAIN_OUTPUTS)  # from here on the folder is this run's (and its resumes')
    metrics = MetricsWriter(
        out,
        active=ctx.is_main,
        tensorboard=cfg.output.tensorboard,
        resume_step=state.step if loaded else None,
    )
    plan = CheckpointPlan(root, cfg.train.save_every, cfg.train.keep_last, run_settings(cfg))
    try:
        result = train_loop(
            wrap_model(model, ctx),
            optimizer,
            data.train,
            data.val,
            _collate_fn(tokenizer),
            cfg.train,
            total_steps=steps,
            state=state,
            plan=plan,
            metrics=metrics,
            ctx=ctx,
            autocast_dtype=autocast_dtype,
        )
    finally:
        metrics.close()
    if result.stop_reason == "signal":
        _say(
            ctx,
            f"interrupted at step {result.state.step}: checkpoint saved in {result.checkpoint or root}; "
            "run the same command with --resume to continue",
        )
        return TrainOutcome(out, result.stop_reason, result.signal, {})
    after = _compare(model, tokenizer, data, cfg, ctx, eval_kw)
    summary: dict[str, Any] = {}
    if ctx.is_main:
        summary = _summary(cfg, ctx, data, result, before, after, inject_report, steps, started)
        _write_outputs(cfg, model, tokenizer, result.state, metrics.records(), summary)
        print(_report(summary), flush=True)
    barrier(ctx)
    return TrainOutcome(out, result.stop_reason, None, summary)


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


def _write_outputs(
    cfg: Config, model: nn.Module, tokenizer: Any, state: LoopState, records: list[dict], summary: dict
) -> None:
    """Adapter (PEFT format), best adapter, tokenizer, resolved config, loss curve, summary (rank 0)."""
    import yaml

    out = Path(cfg.output.dir)
    save_adapter(model, out, cfg.lora, base_model_name_or_path=cfg.model.name)
    _save_best_adapter(model, cfg, state, out / "checkpoints", out)
    save_tokenizer(tokenizer, out)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    plotted = plot_loss_curve(records, out / PLOT) if cfg.output.plot else None
    summary["loss_curve"] = PLOT if plotted is not None else None  # the README lists only files written
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "README.md", render_summary(summary))


def _summary(
    cfg: Config,
    ctx: DistContext,
    data: Any,
    result: Any,
    before: dict,
    after: dict,
    inject_report: str,
    steps: int,
    started: float,
) -> dict[str, Any]:
    records = held_out_records(data.val_records, cfg.output.samples)
    refs = [reference_answer(r) for r in records]
    gens = [
        {
            "prompt": r.messages[-2].content if r.messages and len(r.messages) > 1 else r.source,
            "reference": ref,
            "before": b,
            "after": a,
        }
        for r, ref, b, a in zip(records, refs, before["texts"], after["texts"], strict=True)
    ]
    st = result.state
    return {
        "output_dir": str(cfg.output.dir),
        "base_model": cfg.model.name,
        "quantization": (
            f"{cfg.quant.quant_type} 4-bit, blocksize {cfg.quant.blocksize}, double quant "
            f"{cfg.quant.double_quant}"
        )
        if cfg.quant.enabled
        else "16-bit (no quantization)",
        "lora_r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "trainable": inject_report,
        "data_summary": data.stats.summary().splitlines()[-1],
        "steps": st.step,
        "total_steps": steps,
        "stop_reason": result.stop_reason,
        "epochs": st.position / max(1, len(data.train)),
        "world_size": ctx.world_size,
        "final_train_loss": st.last_train_loss,
        "val_loss_before": before["loss"],
        "val_loss_after": after["loss"],
        "best_val_loss": st.best_val_loss,
        "best_step": st.best_step,
        "samples": len(records),
        "exact_before": sum(_norm(g["before"]) == _norm(g["reference"]) for g in gens),
        "exact_after": sum(_norm(g["after"]) == _norm(g["reference"]) for g in gens),
        "generations": gens,
        "wall_time_s": time.perf_counter() - started,
        "train_time_s": st.train_time_s,
        "tokens_per_s": st.tokens / max(st.train_time_s, 1e-9),
        "peak_rss_mib": peak_rss_mib(),
    }


def _report(s: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        f"adapter saved in {s['output_dir']} (adapter_config.json + adapter_model.safetensors, PEFT format)",
        f"steps {s['steps']}/{s['total_steps']} ({s['stop_reason']}), wall time {s['wall_time_s']:.1f} s, "
        f"{s['tokens_per_s']:.0f} tokens/s, peak RSS {s['peak_rss_mib']:.0f} MiB",
        f"{'':<28}{'before':>16}{'after':>16}",
        f"{'validation loss':<28}{f(s['val_loss_before']):>16}{f(s['val_loss_after']):>16}",
        f"{'exact match (held-out)':<28}{exact_match_text(s['exact_before'], s['samples']):>16}"
        f"{exact_match_text(s['exact_after'], s['samples']):>16}",
    ]
    for g in s["generations"]:
        lines += [
            f"- prompt: {g['prompt']!r}",
            f"    reference: {g['reference']!r}",
            f"    before:    {g['before']!r}",
            f"    after:     {g['after']!r}",
        ]
    return "\n".join(lines)
