"""Optimizers and learning-rate schedules.

Schedules are pure functions of the step number: the loop sets `group["lr"]` from `lr_at(step, ...)`
before every optimizer step, so a resumed run needs nothing but the step counter to be on the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from qlorakit.config import TrainConfig
from qlorakit.core.errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")

# ---------------------------------------------------------------------------------------------------------
# Schedules: multipliers of the base learning rate for 0-based optimizer step `step`.


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup: 1/w, 2/w, ..., 1 over the first `w` steps (the first step already moves), then 1."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def decay_progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """Fraction in [0, 1] of the post-warmup phase done before step `step` (0 at its first step)."""
    span = max(1, total_steps - warmup_steps)
    return min(1.0, max(0.0, (step - warmup_steps) / span))


def constant_factor(progress: float) -> float:
    return 1.0


def linear_factor(progress: float) -> float:
    """1 -> 0 linearly over the decay phase."""
    return 1.0 - progress


def cosine_factor(progress: float) -> float:
    """Half a cosine from 1 to 0 over the decay phase."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


_DECAY = {"constant": constant_factor, "linear": linear_factor, "cosine": cosine_factor}


def lr_at(step: int, *, base_lr: float, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The learning rate used by 0-based optimizer step `step` of a run of `total_steps` steps."""
    if schedule not in _DECAY:
        raise ConfigError(f"train.schedule: must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step < warmup_steps:
        return base_lr * warmup_factor(step, warmup_steps)
    return base_lr * _DECAY[schedule](decay_progress(step, warmup_steps, total_steps))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------------------
# Optimizer factory.


def _bitsandbytes_optim(name: str):
    """The bitsandbytes optimizer class for `name`; ConfigError when it cannot run here."""
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError as exc:
        raise ConfigError(
            f"train.optim={name!r} needs the bitsandbytes package; install it or use train.optim=adamw"
        ) from exc
    if not torch.cuda.is_available():
        raise ConfigError(
            f"train.optim={name!r} needs a CUDA GPU (bitsandbytes 8-bit/paged optimizers run on CUDA only); "
            "use train.optim=adamw on this machine"
        )
    classes = {
        "adamw_8bit": bnb_optim.AdamW8bit,
        "paged_adamw_8bit": bnb_optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb_optim.PagedAdamW32bit,
    }
    return classes[name]


def check_optimizer(name: str) -> None:
    """Fail early (before any model is loaded) when optimizer `name` cannot run here."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"train.optim: must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name != "adamw":
        _bitsandbytes_optim(name)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.optim` over `params` (the trainable ones).

    `adamw` is `torch.optim.AdamW`; the 8-bit and paged variants come from bitsandbytes and need CUDA.
    The learning rate set here is overwritten every step by the schedule.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters: check lora.target_modules")
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optim in OPTIMIZERS:
        cls = _bitsandbytes_optim(cfg.optim)
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"train.optim: must be one of {', '.join(OPTIMIZERS)}, got {cfg.optim!r}")


def steps_per_epoch(num_examples: int, batch_size: int, grad_accum: int, world_size: int) -> int:
    """Optimizer steps that consume `num_examples` once (the last partial step counts)."""
    per_step = batch_size * grad_accum * world_size
    return max(1, math.ceil(num_examples / per_step))


def total_steps(cfg: TrainConfig, num_examples: int, world_size: int) -> int:
    """`max_steps`, or fewer when `epochs` is set and reached first."""
    if cfg.epochs is None:
        return cfg.max_steps
    by_epochs = math.ceil(
        cfg.epochs * steps_per_epoch(num_examples, cfg.batch_size, cfg.grad_accum, world_size)
    )
    return max(1, min(cfg.max_steps, by_epochs))


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(module path, parameter) of every trainable parameter, in `named_parameters` order.

    The optimizer and the checkpoints both use this order, so parameter i of the optimizer state is
    always the parameter with the i-th name.
    """
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
