"""Shared pieces for the loop/checkpoint tests: a tiny real Llama with qlorakit's `LoRALinear` on a few
layers, a learnable token task and the training loop run on them without the CLI.

These tests exercise the training machinery on its own; the end-to-end CLI tests (helpers.cli) use the
real qlorakit quantization, LoRA injection and data pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from helpers.tiny import make_tiny_llama
from qlorakit.config import TrainConfig
from qlorakit.lora.layer import LoRALinear
from qlorakit.train.distributed import DistContext
from qlorakit.train.loop import CheckpointPlan, LoopState, train_loop
from qlorakit.train.metrics import MetricsWriter
from qlorakit.train.optim import build_optimizer, trainable_named_parameters


@dataclass(frozen=True)
class Ex:
    input_ids: list[int]
    labels: list[int]
    source: str = "test"


def _lora(base: nn.Linear, r: int, dropout: float, seed: int) -> LoRALinear:
    """qlorakit's `LoRALinear` with scaling 1 (alpha = r), A ~ N(0, 0.1^2) drawn from `seed`, B = 0."""
    layer = LoRALinear(base, r=r, alpha=float(r), dropout=dropout, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(r, base.in_features, generator=gen) * 0.1)
    return layer


def tiny_lora_model(dropout: float = 0.1, r: int = 4, seed: int = 0) -> nn.Module:
    """A tiny Llama, frozen, with LoRA on q/v/down projections and on the head."""
    model = make_tiny_llama(seed=seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        attn.q_proj = _lora(attn.q_proj, r, dropout, seed + 10 * i)
        attn.v_proj = _lora(attn.v_proj, r, dropout, seed + 10 * i + 1)
        layer.mlp.down_proj = _lora(layer.mlp.down_proj, r, dropout, seed + 10 * i + 2)
    # The random head's logits are tiny (std-0.02 weights); adapting it lets the loss actually fall.
    model.lm_head = _lora(model.lm_head, r, dropout, seed + 99)
    model.config.use_cache = False
    return model


def make_examples(n: int, seed: int, length: tuple[int, int] = (3, 8), vocab: int = 320) -> list[Ex]:
    """A learnable task: a random prompt, then one of 4 fixed answers chosen by the prompt's first token.

    Only the answer tokens carry labels (like response-only training).
    """
    gen = torch.Generator().manual_seed(seed)
    answers = [[10 + 5 * k + j for j in range(5)] for k in range(4)]
    rows = []
    for _ in range(n):
        size = int(torch.randint(length[0], length[1] + 1, (1,), generator=gen))
        prompt = torch.randint(40, vocab, (size,), generator=gen).tolist()
        answer = answers[prompt[0] % 4]
        rows.append(Ex(prompt + answer, [-100] * size + answer))
    return rows


def collate(examples, pad_id: int = 3) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


def run_tiny(
    out: Path,
    cfg: TrainConfig,
    *,
    train=None,
    val=None,
    model: nn.Module | None = None,
    state: LoopState | None = None,
    optimizer=None,
    collate_fn=collate,
    reseed: bool = True,
):
    """Seed, build (unless given) and run the loop on the tiny model; returns (result, model, optimizer).

    `reseed=False` keeps the current RNG state (a resumed run restores it from the checkpoint).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only spin (and the test machine is shared)
    try:
        return _run_tiny(out, cfg, train, val, model, state, optimizer, collate_fn, reseed)
    finally:
        torch.set_num_threads(threads)


def _run_tiny(out, cfg, train, val, model, state, optimizer, collate_fn, reseed):
    if reseed:
        torch.manual_seed(cfg.seed)
    model = model if model is not None else tiny_lora_model()
    optimizer = optimizer or build_optimizer((p for _, p in trainable_named_parameters(model)), cfg)
    train = train if train is not None else make_examples(32, seed=1)
    val = val if val is not None else make_examples(8, seed=2)
    plan = CheckpointPlan(out / "checkpoints", cfg.save_every, cfg.keep_last, {"seed": cfg.seed})
    metrics = MetricsWriter(
        out, active=True, tensorboard=False, resume_step=None if state is None else state.step
    )
    result = train_loop(
        model,
        optimizer,
        train,
        val,
        collate_fn,
        cfg,
        total_steps=cfg.max_steps,
        state=state or LoopState(),
        plan=plan,
        metrics=metrics,
        ctx=SINGLE,
    )
    metrics.close()
    return result, model, optimizer


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable_named_parameters(model)}
