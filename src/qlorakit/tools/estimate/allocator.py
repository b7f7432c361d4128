"""What the C allocator keeps resident after PyTorch frees memory, by `qlorakit.core.memory` mode.

The `qlorakit` command installs one of three modes (QLORAKIT_MALLOC_TUNING, see `qlorakit.core.memory`):
- "cache" (default): every tensor of 1 MiB or more is its own mapping; a freed one stays mapped in a
  cache keyed by size class, for reuse, up to QLORAKIT_BLOCK_CACHE_MIB (256 MiB). At the peak the cache
  holds the large blocks loading freed that nothing reused, and part of a pass's activation blocks.
- "mmap": the same mappings, returned the moment they are freed: nothing is kept.
- "off": glibc's dynamic mmap threshold. Freed heap memory between live allocations stays resident.
Tensors under 1 MiB go to glibc's heap in every mode, so short rows (every activation under 1 MiB) leave
as much in the heap as mode "off" does.
Measured with 12-step QLoRA runs of a hidden-512, 4-layer Llama (one batch shape and twelve) and 20-step
runs of SmolLM2-135M, fp32 and bf16 compute, each mode in its own process.
"""

from __future__ import annotations

from qlorakit.core.dtypes import dtype_bytes
from qlorakit.core.errors import ConfigError
from qlorakit.core.memory import DEFAULT_MMAP_THRESHOLD, MODES, block_cache_bytes
from qlorakit.models.shape import LinearShape, ModelShape

ALLOCATOR_MODES = MODES
# Share of a non-checkpointed pass's activations glibc's heap keeps beyond what the run holds, of the
# activations it serves (see `allocator_bytes`). Measured 0.8-1.6 (hidden-512 Llama, one batch shape:
# 0.93 bf16, 1.32 fp32; SmolLM2-135M, 17 shapes: 1.55 bf16, 0.79 fp32): more shapes fragment more.
GLIBC_RETENTION = 1.2
# Without checkpointing: share of a pass of another batch shape the heap keeps (the hidden-512 Llama,
# varying rows, mode "off": predicted within 1% of the measured peak in bf16 and fp32).
GLIBC_RETENTION_ACROSS_SHAPES = 0.6
# Mode "cache": share of the large blocks freed before the peak that the cache holds, per distinct
# training batch shape (measured 26-37% with one shape on a hidden-512 Llama; the cache ran full with 12).
CACHE_SHARE_PER_SHAPE = 0.3


def _activation_split(arch: ModelShape, tokens: int, e: int, adapted: list[LinearShape]) -> tuple[int, int]:
    """A non-checkpointed pass's activations as (bytes in tensors under the mmap threshold, bytes in
    tensors at or above it): per layer the fp32 norm inputs and 16-bit outputs (h), q/k/v/attention
    outputs (q and kv widths), the MLP's (i); LoRA's [tokens, r] down-projections (at r=16) stay small."""
    h, qd, kvd, i = (arch.hidden_size, arch.num_heads * arch.head_dim,
                     arch.num_kv_heads * arch.head_dim, arch.intermediate_size)  # fmt: skip
    kinds = [(h * 4, arch.norms_per_layer), (h * e, arch.norms_per_layer), (qd * e, 4), (kvd * e, 2)]
    kinds += [(i * e, 4 if arch.gated_mlp else 2)] + [(16 * e, 1) for _ in adapted]  # + LoRA's [tokens, r]
    small = sum(w * n for w, n in kinds if tokens * w < DEFAULT_MMAP_THRESHOLD)
    large = sum(w * n for w, n in kinds if tokens * w >= DEFAULT_MMAP_THRESHOLD)
    return arch.num_layers * tokens * small, arch.num_layers * tokens * large


def _loading_leftover_bytes(arch: ModelShape, method: str, e: int) -> int:
    """Blocks loading frees that nothing reuses: each full-precision tensor outside the decoder layers
    (the embeddings, an untied head) read in another dtype than the compute dtype is converted, and its
    read copy freed; QLoRA's loader also leaves one linear in transit (stored, compute dtype, fp32). A
    16-bit load converts the linears from the mapped file's pages (nothing freed)."""
    stored = dtype_bytes(arch.checkpoint_dtype)
    read = [n * stored for n in (arch.embedding_params(), arch.head_params()) if stored != e]
    leftover = sum(b for b in read if b >= DEFAULT_MMAP_THRESHOLD)
    if method == "qlora":
        leftover += max(lin.numel for lin in arch.layer_linears()) * (stored + e + 4)
    return leftover


def allocator_bytes(
    mode: str,
    arch: ModelShape,
    method: str,
    adapted: list[LinearShape],
    e: int,
    tokens: int,
    activations: tuple[int, int],
    grad_checkpointing: bool,
    train_shapes: int,
) -> int:
    """Freed bytes resident at the training peak in allocator `mode`, for `tokens` tokens per batch in
    `e`-byte compute; `activations`: (a non-checkpointed pass's, what the run holds at its peak);
    `train_shapes`: distinct training batch shapes.

    Freed before the peak and not reused: with checkpointing, the tensors of the recomputed layers;
    without, a pass of another batch shape, whose tensors do not fit this one's. glibc's heap keeps
    GLIBC_RETENTION (GLIBC_RETENTION_ACROSS_SHAPES) of the freed tensors it serves: those under 1 MiB in modes "cache" and "mmap" (short
    rows put every activation there), all in "off". Mode "cache" also keeps the freed large blocks
    (CACHE_SHARE_PER_SHAPE of them per shape when every batch has one shape) and loading's leftovers, up
    to its bound."""
    if mode not in ALLOCATOR_MODES:
        raise ConfigError(f"unknown allocator mode {mode!r}; use one of {', '.join(ALLOCATOR_MODES)}")
    full, held = activations
    small, large = _activation_split(arch, tokens, e, adapted)
    in_heap = 1.0 if mode == "off" else small / max(1, small + large)
    if grad_checkpointing:
        freed, freed_large, kept = max(0, full - held), max(0, large - held), GLIBC_RETENTION
    else:
        freed, freed_large = (full, large) if train_shapes > 1 else (0, 0)
        kept = GLIBC_RETENTION_ACROSS_SHAPES
    retained = int(kept * in_heap * freed)
    if mode == "cache":
        share = min(1.0, CACHE_SHARE_PER_SHAPE * train_shapes)
        stale = _loading_leftover_bytes(arch, method, e) + int(freed_large * share)
        retained += min(block_cache_bytes(), stale)
    return retained


__all__ = ["ALLOCATOR_MODES", "CACHE_SHARE_PER_SHAPE", "GLIBC_RETENTION", "allocator_bytes"]
