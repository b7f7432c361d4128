"""Data-parallel helpers: process-group setup from the torchrun environment, DDP wrapping, collectives.

One process per device. Every rank holds the whole frozen (4-bit) base and a replica of the LoRA weights;
DDP all-reduces only the gradients of trainable parameters, so the traffic is the adapter's size.
A single process (no torchrun) gets a `DistContext` with `world_size == 1` and every helper is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from qlorakit.core.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    """`gloo` (CPU) or `nccl` (CUDA) when a process group was created, else None."""

    @property
    def is_main(self) -> bool:
        """Rank 0 is the only one that writes metrics, checkpoints and outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from exc


def setup_distributed() -> DistContext:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and join the process group.

    CUDA: one GPU per process (`cuda:LOCAL_RANK`) with NCCL; CPU: gloo.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size <= 1:
        return DistContext(0, 1, 0, device, None)
    import torch.distributed as dist

    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if cuda else None)
    return DistContext(rank, world_size, local_rank, device, backend)


def teardown_distributed(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP over the trainable parameters; the model itself when single-process.

    `broadcast_buffers=False`: the packed 4-bit weights are buffers, identical on every rank by
    construction; re-broadcasting them every forward would cost the whole model's size in traffic.
    """
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of `values` over ranks (a copy; float64 or int64 tensors on any device)."""
    if not ctx.distributed:
        return values.clone()
    import torch.distributed as dist

    out = values.to(ctx.device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


def all_reduce_max_flag(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. a stop signal received by one rank)."""
    if not ctx.distributed:
        return flag
    return bool(all_reduce_sum(torch.tensor([1 if flag else 0], dtype=torch.int64), ctx).item() > 0)


def gather_bytes(data: bytes, ctx: DistContext) -> list[bytes]:
    """Every rank's byte string (e.g. serialized RNG states), on every rank, in rank order."""
    if not ctx.distributed:
        return [data]
    import torch.distributed as dist

    length = torch.tensor([len(data)], dtype=torch.int64, device=ctx.device)
    lengths = [torch.empty_like(length) for _ in range(ctx.world_size)]
    dist.all_gather(lengths, length)
    sizes = [int(t.item()) for t in lengths]
    local = torch.zeros(max(sizes), dtype=torch.uint8)
    local[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else local[:0]
    local = local.to(ctx.device)
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local)
    return [p.cpu()[:n].numpy().tobytes() for p, n in zip(parts, sizes, strict=True)]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's `flag` on every rank."""
    if not ctx.distributed:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=ctx.device)
    dist.broadcast(value, src=0)
    return bool(value.item())
