"""What fits a memory budget: the run's settings read from a training config, and the advice per method."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from qlorakit.config import Config
from qlorakit.core.dtypes import dtype_name
from qlorakit.core.memory import requested_mode
from qlorakit.models.shape import ModelShape
from qlorakit.quant.linear import default_compute_dtype
from qlorakit.tools.estimate.kernel_cache import RunShapes
from qlorakit.tools.estimate.memory import CONFIG_OPTIMIZERS, METHODS, MemoryEstimate, estimate_memory


@dataclass(frozen=True)
class RunSettings:
    """The settings of a training run that decide its memory: the keywords of `estimate_memory`."""

    method: str
    batch: int
    seq: int
    r: int
    targets: str | tuple[str, ...]
    grad_checkpointing: bool
    compute_dtype: str
    optimizer: str
    blocksize: int
    double_quant: bool
    lora_dropout: float
    allocator: str
    shapes: RunShapes | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> RunSettings:
        """What `qlorakit train` does with `cfg` on this machine: `quant.enabled` picks QLoRA or 16-bit
        LoRA, `compute_dtype: auto` resolves as training resolves it on the CPU, the allocator mode is the
        one `QLORAKIT_MALLOC_TUNING` selects. Gradient accumulation changes no memory: the gradients stay
        allocated between micro-batches anyway."""
        q, lo, t = cfg.quant, cfg.lora, cfg.train
        dtype = q.compute_dtype if q.compute_dtype != "auto" else dtype_name(default_compute_dtype("cpu"))
        targets = lo.target_modules if isinstance(lo.target_modules, str) else tuple(lo.target_modules)
        return cls(
            method="qlora" if q.enabled else "lora",
            batch=t.batch_size,
            seq=cfg.data.max_length,
            r=lo.r,
            targets=targets,
            grad_checkpointing=t.gradient_checkpointing,
            compute_dtype=dtype,
            optimizer=CONFIG_OPTIMIZERS[t.optim],
            blocksize=q.blocksize,
            double_quant=q.double_quant,
            lora_dropout=lo.dropout,
            allocator=requested_mode(),
        )

    def with_shapes(self, shapes: RunShapes) -> RunSettings:
        """These settings over the replayed shapes of the run's data: the activations of its longest
        training batch (at most max_length tokens per row), the kernels of every shape."""
        return replace(self, shapes=shapes, seq=shapes.longest.length)

    def estimate(self, arch: ModelShape) -> MemoryEstimate:
        return estimate_memory(arch, **{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class MethodAdvice:
    """What fits a budget with one method. `max_batch` is at the asked `seq`; `max_seq` at batch 1;
    0 means nothing fits."""

    method: str
    fits: bool
    grad_checkpointing: bool
    max_batch: int
    max_seq: int
    peak_bytes: int
    """`MemoryEstimate.required` at `max_batch` (the memory that must fit, without droppable file pages)."""


@dataclass(frozen=True)
class Advice:
    budget_bytes: int
    seq: int
    methods: tuple[MethodAdvice, ...]

    @property
    def recommended(self) -> MethodAdvice | None:
        """The first method in (full, lora, qlora) order that fits at batch >= 1: the highest fidelity."""
        return next((m for m in self.methods if m.fits), None)


def _largest_power_of_two(fits: Any, limit: int) -> int:
    best, n = 0, 1
    while n <= limit and fits(n):
        best, n = n, n * 2
    return best


def advise(
    arch: ModelShape,
    budget_bytes: int,
    *,
    seq: int = 512,
    methods: tuple[str, ...] = METHODS,
    max_batch: int = 1024,
    max_seq: int = 131072,
    **kwargs: Any,
) -> Advice:
    """For each method: the largest power-of-two batch at `seq` and sequence length at batch 1 (at most the
    model's context) whose `required` memory fits `budget_bytes`, with gradient checkpointing only when it allows a larger batch.
    `kwargs` go to `estimate_memory` (r, targets, compute_dtype, optimizer, blocksize, double_quant)."""
    kwargs.pop("grad_checkpointing", None)
    if arch.max_positions:
        max_seq = min(max_seq, arch.max_positions)  # longer sequences than the model's context are no advice
    out = []
    for method in methods:

        def peak(b: int, s: int, gc: bool, method: str = method) -> int:
            return estimate_memory(
                arch, method=method, batch=b, seq=s, grad_checkpointing=gc, **kwargs
            ).required

        best = {}
        for gc in (False, True):
            b = _largest_power_of_two(lambda b, gc=gc, p=peak: p(b, seq, gc) <= budget_bytes, max_batch)
            s = _largest_power_of_two(lambda s, gc=gc, p=peak: p(1, s, gc) <= budget_bytes, max_seq)
            best[gc] = (b, s)
        # checkpointing costs a second forward pass: use it only where it buys a larger batch
        gc = best[True][0] > best[False][0]
        best_batch, best_seq = best[gc]
        fits = best_batch >= 1
        used = peak(max(best_batch, 1), seq, gc)
        out.append(MethodAdvice(method, fits, gc, best_batch, best_seq, used))
    return Advice(budget_bytes, seq, tuple(out))
