"""Memory the CPU's 16-bit matmul kernels keep: one compiled kernel per matmul shape, for the whole run.

PyTorch runs bf16/fp16 matmuls on the CPU through oneDNN, which JIT-compiles a kernel for every new
problem shape (M x K : K x N plus memory layouts) and keeps it in two caches (oneDNN's primitive cache
and ideep's LRU cache, 1024 entries each by default, `ONEDNN_PRIMITIVE_CACHE_CAPACITY` and
`LRU_CACHE_CAPACITY`). Measured on an AVX512-BF16 CPU with torch 2.13: 0.5-0.9 MiB per shape, whatever
M, K and N, resident until the process ends (3,200 shapes took 3.6 GiB); fp32 matmuls go to MKL's sgemm
and keep nothing. Training pads each batch to its longest row, so every new padded length compiles a
new set of kernels: the memory grows with the number of distinct batch shapes a run sees, not with its
size. This module counts those shapes per batch from the model's layer shapes, mirroring what the
training step runs:

    frozen linear     forward x @ W^T per distinct (in, out) pair; backward g @ W per pair. A 4-bit
                      weight is dequantized CHUNK_ELEMENTS at a time (`qlorakit.quant.linear`), so its
                      matmuls run per row (forward) and column (backward) chunk
    LoRA              forward x @ A^T per distinct in, h @ B^T per distinct out; backward three more each
                      (g @ B and g^T @ h per out, x^T @ g_h and g_h @ A per in)
    output head       the fused loss (`qlorakit.loss`): one [tokens, vocab] block shape per
                      chunk size, forward and backward, per distinct count of label tokens
    attention         SDPA's blocked kernels: two per distinct padded length

Counted against the kernels oneDNN reported (ONEDNN_VERBOSE) for 12-step runs of two Llama shapes: 33 of
33 with one batch shape, 376 counted for 369 seen with variable rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qlorakit.loss import DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNK_VOCAB
from qlorakit.models.shape import LinearShape, ModelShape
from qlorakit.quant.linear import CHUNK_ELEMENTS

MiB = 2**20
# Resident bytes per compiled kernel (heap in use plus the fragmentation it leaves): (peak RSS of a
# 12-step bf16 QLoRA run with 369 kernels - the same run with 33) / 336, on a 4-layer, hidden-512 Llama.
KERNEL_BYTES = int(0.67 * MiB)
ATTENTION_KERNELS = 2


@dataclass(frozen=True)
class BatchShape:
    """One batch the model runs: `rows` sequences padded to `length` tokens, `labels` of them in the loss."""

    rows: int
    length: int
    labels: int

    @property
    def tokens(self) -> int:
        return self.rows * self.length


@dataclass(frozen=True)
class RunShapes:
    """The distinct batch shapes of one run (`qlorakit.tools.estimate.run_shapes` replays them from a run's data).

    `generate`: (rows, prompt width) of each batched generation call of the held-out samples."""

    train: frozenset[BatchShape]
    evaluate: frozenset[BatchShape] = frozenset()
    generate: frozenset[tuple[int, int]] = frozenset()
    source: str = "max_length"
    """"data" (replayed from the run's data) or "max_length" (every row assumed max_length tokens)."""

    @classmethod
    def uniform(cls, batch: int, seq: int) -> RunShapes:
        """Every row `seq` tokens, all of them trained: one shape for training and evaluation."""
        shape = BatchShape(batch, seq, batch * (seq - 1))
        return cls(frozenset({shape}), frozenset({shape}))

    @property
    def longest(self) -> BatchShape:
        """The training batch with the most tokens (its activations set the training peak)."""
        return max(self.train, key=lambda s: (s.tokens, s.labels))


def _sizes(total: int, chunk: int) -> set[int]:
    """The distinct chunk sizes of `total` split into pieces of `chunk`."""
    return {chunk} | ({total % chunk} if total % chunk else set()) if total > chunk else {total}


def linear_chunks(lin: LinearShape, quantized: bool, blocksize: int) -> tuple[set[int], set[int]]:
    """(output widths of the forward matmuls, input widths of the backward ones) of one frozen linear."""
    if not quantized:
        return {lin.out_features}, {lin.in_features}
    step = blocksize // math.gcd(lin.in_features, blocksize)
    rows = max(step, CHUNK_ELEMENTS // lin.in_features // step * step)
    if lin.in_features % blocksize:
        cols = lin.in_features
    else:
        cols = max(blocksize, CHUNK_ELEMENTS // lin.out_features // blocksize * blocksize)
    return _sizes(lin.out_features, rows), _sizes(lin.in_features, cols)


def linear_kernels(
    arch: ModelShape, adapted: list[LinearShape], quantized: bool, blocksize: int, *, train: bool, full: bool
) -> int:
    """Kernels the decoder layers compile for one new token count (forward, plus backward if `train`).

    `full`: every weight trains, so the backward also computes g^T @ x per (in, out) pair."""
    forward, backward = set(), set()
    for lin in arch.layer_linears():
        outs, ins = linear_chunks(lin, quantized, blocksize)
        forward |= {(lin.in_features, n) for n in outs}
        backward |= {(lin.out_features, k) for k in ins}
    ins = {lin.in_features for lin in adapted}
    outs = {lin.out_features for lin in adapted}
    if not train:
        return len(forward) + len(ins) + len(outs)
    pairs = {(lin.in_features, lin.out_features) for lin in arch.layer_linears()}
    return len(forward) + len(backward) + 3 * (len(ins) + len(outs)) + (len(pairs) if full else 0)


def head_blocks(vocab: int, label_counts: set[int]) -> set[tuple[int, int]]:
    """The [tokens, vocab] block shapes of the fused output head + loss (`qlorakit.loss` chunk
    defaults) over batches with the given label-token counts; each is one forward kernel, and one more in
    training (the backward recomputes the block, then multiplies it back)."""
    vocab_sizes = _sizes(vocab, DEFAULT_CHUNK_VOCAB)
    return {
        (t, v) for n in label_counts if n > 0 for t in _sizes(n, DEFAULT_CHUNK_TOKENS) for v in vocab_sizes
    }


def kernel_bytes(
    arch: ModelShape,
    adapted: list[LinearShape],
    e: int,
    blocksize: int,
    shapes: RunShapes,
    *,
    method: str,
    fused_loss: bool,
) -> int:
    """Resident bytes of the matmul kernels a run over `shapes` compiles with `e`-byte compute (none in
    fp32); `fused_loss`: the loss runs qlorakit's fused head (else the full logits)."""
    if e == 4:
        return 0
    quantized, full = method == "qlora", method == "full"
    train_tokens = {s.tokens for s in shapes.train}
    eval_tokens = {s.tokens for s in shapes.evaluate} - train_tokens
    # generation: the prompts at once, then one token per row per step
    gen_tokens = {r * w for r, w in shapes.generate} | {r for r, _ in shapes.generate}
    gen_tokens -= train_tokens | eval_tokens
    n = len(train_tokens) * linear_kernels(arch, adapted, quantized, blocksize, train=True, full=full)
    n += (len(eval_tokens) + len(gen_tokens)) * linear_kernels(
        arch, adapted, quantized, blocksize, train=False, full=full
    )
    lengths = {s.length for s in shapes.train | shapes.evaluate} | {w for _, w in shapes.generate}
    n += ATTENTION_KERNELS * len(lengths) + len({r for r, _ in shapes.generate})  # + the decoding head
    if fused_loss:
        trained = head_blocks(arch.vocab_size, {s.labels for s in shapes.train})
        evaluated = head_blocks(arch.vocab_size, {s.labels for s in shapes.evaluate})
        n += 2 * len(trained) + len(evaluated - trained)
    else:  # the full logits: forward and input gradient per token count (+ the weight gradient in full)
        n += len(train_tokens) * (3 if full else 2) + len(eval_tokens)
    return n * KERNEL_BYTES


__all__ = ["ATTENTION_KERNELS", "KERNEL_BYTES", "BatchShape", "RunShapes", "head_blocks", "kernel_bytes",
           "linear_chunks", "linear_kernels"]  # fmt: skip
