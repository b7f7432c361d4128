"""The memory model of a training run: every component in bytes, from a model's shape and the run's settings.

See the package docstring (`qlorakit.tools.estimate`) for what each component counts and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from qlorakit.core.dtypes import MiB, dtype_bytes, dtype_name
from qlorakit.core.errors import ConfigError
from qlorakit.core.memory import requested_mode
from qlorakit.loss import DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNK_VOCAB, FUSED_ARCHITECTURES
from qlorakit.models.shape import LinearShape, ModelShape, target_linears
from qlorakit.quant.settings import blocksize_problem
from qlorakit.tools.estimate.allocator import allocator_bytes
from qlorakit.tools.estimate.kernel_cache import RunShapes, kernel_bytes

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd")
# Measured on the reference CPU box (torch 2.13, transformers 5): RSS after importing torch and
# transformers is 346 MiB; `qlorakit train` of a 2-layer, 320-token-vocabulary Llama peaks at 380-386 MiB.
IMPORT_RSS_BYTES = 346 * MiB
RUNTIME_OVERHEAD_BYTES = 385 * MiB
NESTED_BLOCKSIZE = 256
# The fused loss's logits block (qlorakit.loss defaults) and how many live at its peak.
LOSS_CHUNK_TOKENS, LOSS_CHUNK_VOCAB, LOSS_LIVE_BLOCKS = DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNK_VOCAB, 3
COMPONENTS = ("weights", "quant_constants", "adapters", "gradients", "optimizer", "activations", "logits",
              "allocator", "kernels", "workspace", "runtime")  # fmt: skip
# Optimizer names of `train.optim` -> the state layout estimated (paged variants hold the same states).
CONFIG_OPTIMIZERS = {"adamw": "adamw", "paged_adamw_32bit": "adamw", "adamw_8bit": "adamw_8bit",
                     "paged_adamw_8bit": "adamw_8bit"}  # fmt: skip


def quantized_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> tuple[int, int]:
    """`(packed_bytes, constant_bytes)` of one 4-bit tensor of `numel` elements, as bitsandbytes stores it.

    Packed: two 4-bit codes per byte. Constants: one absmax per block (uint8 code with double quant,
    fp32 without), the 16-entry fp32 code table, and with double quant one fp32 absmax per 256 blocks,
    the 256-entry fp32 dynamic map and the fp32 offset.
    """
    blocks = math.ceil(numel / blocksize)
    packed = (numel + 1) // 2
    if not double_quant:
        return packed, blocks * 4 + 16 * 4
    nested = math.ceil(blocks / NESTED_BLOCKSIZE)
    return packed, blocks + nested * 4 + 16 * 4 + 256 * 4 + 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component for one method; `components` is ordered as the table prints it."""

    method: str
    batch: int
    seq: int
    grad_checkpointing: bool
    components: dict[str, int] = field(default_factory=dict)
    loading: int = 0
    trainable_params: int = 0
    loading_file_pages: int = 0
    """Clean pages of the mapped checkpoint file inside `loading`."""

    @property
    def training(self) -> int:
        return sum(self.components.values())

    @property
    def peak(self) -> int:
        """The peak resident set size of the process."""
        return max(self.training, self.loading)

    @property
    def required(self) -> int:
        """The memory that must fit in RAM: the peak without clean checkpoint-file pages, which the
        kernel drops and re-reads under memory pressure instead of failing."""
        return max(self.training, self.loading - self.loading_file_pages)


def _layer_activation_bytes(
    arch: ModelShape,
    tokens: int,
    e: int,
    method: str,
    adapted: list[LinearShape],
    r: int,
    lora_dropout: float,
) -> int:
    """Bytes autograd saves in one decoder layer for `tokens` = batch * seq tokens.

    Per token, measured on transformers' Llama layer (SDPA attention, which keeps no seq x seq matrix):
    each RMSNorm keeps its fp32 input and its normalized output (h*4 + 4 + h*e), attention keeps q, its
    output, o_proj's input, one more q-sized tensor and k, v at their KV size (4*qd + 2*kvd)*e plus a
    fp32 log-sum-exp per head, the gated MLP keeps gate, silu(gate), up and their product (4*i*e).
    A frozen norm weight does not keep its normalized output. qlorakit's LoRA layer (`qlorakit.lora`)
    keeps its input (the tensor the frozen linear would keep; a 4-bit linear keeps none), its [tokens, r]
    down-projection in the compute dtype and, with dropout, a 1-bit keep-mask.
    """
    h, qd, kvd, i = (
        arch.hidden_size,
        arch.num_heads * arch.head_dim,
        arch.num_kv_heads * arch.head_dim,
        arch.intermediate_size,
    )
    norms = arch.norms_per_layer * (h * 4 + 4 + h * e)
    attention = (4 * qd + 2 * kvd) * e + 4 * arch.num_heads
    mlp = (4 if arch.gated_mlp else 2) * i * e
    per_token = norms + attention + mlp
    if method != "full":
        per_token -= arch.norms_per_layer * h * e
        for lin in adapted:
            per_token += r * e + (-(-lin.in_features // 8) if lora_dropout > 0 else 0)
    return per_token * tokens


def _model_activation_bytes(
    arch: ModelShape, tokens: int, e: int, layer: int, grad_checkpointing: bool
) -> int:
    """All layers' saved tensors plus the embedding output, final norm, lm_head input, token ids and
    rotary cos/sin. With checkpointing each layer keeps only its input, and one layer is recomputed at a
    time during backward."""
    fixed = tokens * (arch.hidden_size * (4 + 4 + 2 * e) + 8 + 2 * arch.head_dim * 4)
    if grad_checkpointing:
        return arch.num_layers * tokens * arch.hidden_size * e + layer + fixed
    return arch.num_layers * layer + fixed


def fused_loss_applies(arch: ModelShape) -> bool:
    """True when qlorakit's training loop computes this architecture's loss with the fused head."""
    return arch.model_type in FUSED_ARCHITECTURES.values()


def _logits_bytes(arch: ModelShape, tokens: int, e: int, fused: bool) -> int:
    """The loss at its backward peak.

    Fused: the per-token logsumexp, target and row index (16 B), the fp32 gradient of the last hidden
    states and its copy in the compute dtype, and LOSS_LIVE_BLOCKS fp32 blocks of logits. Full logits:
    16 B per token per vocabulary entry in any compute dtype. fp32: the logits the model returns (kept
    alive by the loss), the log-probabilities log-softmax saves, and in backward the gradient of the
    log-probabilities and of the logits (4 x 4 B). 16-bit: the 16-bit logits and their fp32 copy's
    log-probabilities and gradients, and the 16-bit gradient (2e + 12).
    """
    if fused:
        block = min(tokens, LOSS_CHUNK_TOKENS) * min(arch.vocab_size, LOSS_CHUNK_VOCAB) * 4
        return tokens * (16 + arch.hidden_size * (4 + e)) + LOSS_LIVE_BLOCKS * block
    return tokens * arch.vocab_size * (16 if e == 4 else 12 + 2 * e)


def _optimizer_bytes(optimizer: str, trainable: int, tensors: int, master: bool) -> int:
    if optimizer == "adamw":
        states = trainable * 8 + tensors * 4  # m, v fp32 + a fp32 `step` scalar per tensor
    elif optimizer == "adamw_8bit":
        states = trainable * 2 + 2 * math.ceil(trainable / 256) * 4 + tensors * 4
    elif optimizer == "sgd":
        states = trainable * 4  # momentum buffer
    else:
        raise ConfigError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    return states + (trainable * 4 if master else 0)


def _loading_bytes(arch: ModelShape, method: str, compute_dtype: Any, c: dict[str, int]) -> tuple[int, int]:
    """(peak RSS while the model is loaded and quantized, clean file pages in it).

    QLoRA: the 4-bit model and the unquantized rest, plus the largest linear in transit (as stored, in
    the compute dtype, and dequantized to fp32 for the quantization report). 16-bit, stored in the
    compute dtype: the mapped file is the model. Converted: the whole mapped file next to the converted
    model until loading ends. A GGUF file is first dequantized to an fp32 model (once: qlorakit caches
    the converted folder, which later runs load as above; `arch.gguf_converted` says it is cached).
    """
    n = arch.num_params()
    runtime = c["runtime"]
    if method == "qlora":
        largest = max(lin.numel for lin in arch.layer_linears())
        in_transit = largest * (dtype_bytes(arch.checkpoint_dtype) + dtype_bytes(compute_dtype) + 4)
        load, pages = runtime + c["weights"] + c["quant_constants"] + in_transit, 0
    elif dtype_name(arch.checkpoint_dtype) == dtype_name(compute_dtype):
        load, pages = runtime + c["weights"], 0
    else:
        pages = n * dtype_bytes(arch.checkpoint_dtype)
        load = runtime + pages + n * dtype_bytes(compute_dtype)
    if arch.checkpoint_format == "gguf" and not arch.gguf_converted and runtime + n * 4 > load:
        load, pages = runtime + n * 4, 0
    return load, pages


def _parameter_bytes(
    arch: ModelShape,
    method: str,
    adapted: list[LinearShape],
    r: int,
    e: int,
    blocksize: int,
    double_quant: bool,
    optimizer: str,
    c: dict[str, int],
) -> int:
    """Fill weights, quantization constants, adapters, gradients, optimizer and workspace; return the
    number of trainable parameters."""
    n_total = arch.num_params()
    largest_linear = max(lin.numel for lin in arch.layer_linears())
    if method == "qlora":
        packed, consts = 0, 0
        for lin in arch.layer_linears():
            p, q = quantized_bytes(lin.numel, blocksize, double_quant)
            packed, consts = packed + p * arch.num_layers, consts + q * arch.num_layers
        c["weights"] = packed + (n_total - arch.linear_weight_params()) * e
        c["quant_constants"] = consts
        c["workspace"] = largest_linear * (4 + e)  # one weight dequantized (fp32 product, then cast)
    else:
        c["weights"] = n_total * e
    if method == "full":
        trainable, tensors = n_total, arch.num_param_tensors()
        c["gradients"] = trainable * e
        # AdamW's per-tensor `denom` temporary (CPU: no foreach)
        c["workspace"] += max(largest_linear, arch.vocab_size * arch.hidden_size) * 4
    else:
        trainable = arch.num_layers * sum(r * (lin.in_features + lin.out_features) for lin in adapted)
        tensors = arch.num_layers * len(adapted) * 2
        c["adapters"] = trainable * 4
        c["gradients"] = trainable * 4
    c["optimizer"] = _optimizer_bytes(optimizer, trainable, tensors, master=method == "full" and e != 4)
    return trainable


def estimate_memory(
    arch: ModelShape,
    *,
    method: str,
    batch: int,
    seq: int,
    r: int = 64,
    targets: str | list[str] | tuple[str, ...] = "all-linear",
    grad_checkpointing: bool = True,
    compute_dtype: Any = "bfloat16",
    optimizer: str = "adamw",
    blocksize: int = 64,
    double_quant: bool = True,
    lora_dropout: float = 0.0,
    shapes: RunShapes | None = None,
    allocator: str | None = None,
) -> MemoryEstimate:
    """The peak memory of training `arch` with `method` on `batch` sequences of `seq` tokens.

    `shapes`: the distinct batch shapes of the run (16-bit kernels are compiled per shape); None means
    every row `seq` tokens. `allocator`: the mode of `qlorakit.core.memory` ("cache", "mmap", "off"); None
    means what `QLORAKIT_MALLOC_TUNING` selects for the `qlorakit` command, as the training command would.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if batch < 1 or seq < 1 or r < 1:
        raise ConfigError(f"batch, seq and r must be positive (got batch={batch}, seq={seq}, r={r})")
    blocksize_error = blocksize_problem(blocksize)
    if blocksize_error is not None:
        raise ConfigError(f"blocksize {blocksize} {blocksize_error}")
    e = dtype_bytes(compute_dtype)
    adapted = [] if method == "full" else target_linears(arch, targets)
    c: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    trainable = _parameter_bytes(arch, method, adapted, r, e, blocksize, double_quant, optimizer, c)

    tokens = batch * seq
    layer = _layer_activation_bytes(arch, tokens, e, method, adapted, r, lora_dropout)
    c["activations"] = _model_activation_bytes(arch, tokens, e, layer, grad_checkpointing)
    c["logits"] = _logits_bytes(arch, tokens, e, fused=method != "full" and fused_loss_applies(arch))
    if grad_checkpointing:  # the loss's backward ends before the first layer is recomputed: whichever
        c["logits"] = max(0, c["logits"] - layer)  # of the two is larger sets the peak
    c["runtime"] = RUNTIME_OVERHEAD_BYTES

    full_acts = _model_activation_bytes(arch, tokens, e, layer, grad_checkpointing=False)
    shapes = shapes or RunShapes.uniform(batch, seq)
    mode = requested_mode() if allocator is None else allocator
    c["allocator"] = allocator_bytes(
        mode, arch, method, adapted, e, tokens, (full_acts, c["activations"]), grad_checkpointing,
        len(shapes.train),
    )  # fmt: skip
    fused = method != "full" and fused_loss_applies(arch)
    c["kernels"] = kernel_bytes(arch, adapted, e, blocksize, shapes, method=method, fused_loss=fused)
    load, pages = _loading_bytes(arch, method, compute_dtype, c)
    return MemoryEstimate(
        method, batch, seq, grad_checkpointing, c, load, trainable, loading_file_pages=pages
    )
