"""A deterministic, resumable order of training examples, sharded by rank.

The training stream is the concatenation of per-epoch permutations of the examples; the permutation of
epoch `e` depends only on `(seed, e)`. A batch is named by its `position` in that stream (examples consumed
so far, summed over ranks), so resuming needs one integer, and `N` ranks with micro-batch `b` read exactly
the examples one rank with micro-batch `N * b` reads.
"""

from __future__ import annotations

import hashlib

import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for `(seed, epoch)` with no collisions between nearby pairs."""
    digest = hashlib.sha256(f"qlorakit-order:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The order of example indices in epoch `epoch` (a permutation of range(num_examples))."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_examples, generator=gen).tolist()


class BatchOrder:
    """Maps stream positions to example indices; caches the permutation of the current epoch."""

    def __init__(self, num_examples: int, seed: int) -> None:
        if num_examples <= 0:
            raise ValueError("BatchOrder needs at least one example")
        self.num_examples = num_examples
        self.seed = seed
        self._epoch = -1
        self._perm: list[int] = []

    def index(self, position: int) -> int:
        """Example index at stream position `position` (>= 0)."""
        epoch, offset = divmod(position, self.num_examples)
        if epoch != self._epoch:
            self._perm = epoch_permutation(self.num_examples, self.seed, epoch)
            self._epoch = epoch
        return self._perm[offset]

    def micro_batch(self, position: int, batch_size: int, rank: int = 0) -> list[int]:
        """Indices of `rank`'s micro-batch of the global micro-batch starting at `position`.

        The global micro-batch holds `batch_size * world_size` consecutive stream entries; rank r takes
        entries `[r * batch_size, (r + 1) * batch_size)` of it.
        """
        start = position + rank * batch_size
        return [self.index(start + i) for i in range(batch_size)]

    def epoch(self, position: int) -> float:
        """Epochs completed at `position` (fractional)."""
        return position / self.num_examples
