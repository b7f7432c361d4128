"""The training loss: output head + next-token cross-entropy, fused so the logits never exist whole.

`token_loss_sum(logits, labels)` is the plain definition. For a batch of N tokens and a vocabulary of V it
holds [N, V] fp32 logits, their log-softmax and their gradient: for 1024 tokens and V = 32000 that is
~500 MB at the backward peak, more than the rest of a gradient-checkpointed QLoRA step.

`linear_cross_entropy_sum(hidden, weight, targets)` computes the same number from the last hidden states
and the head weight, one [chunk_tokens, chunk_vocab] block of logits at a time: the forward keeps only the
per-token logsumexp, the backward recomputes each block and turns it into softmax - one-hot on the spot.
Ignored tokens (-100) are dropped before any matmul, so prompt tokens cost nothing in the head.

`causal_lm_loss_sum(model, inputs, labels)` applies it to a Hugging Face causal LM when that is exactly
the model's own loss (a plain linear head on an architecture known to compute `logits = lm_head(hidden)`),
and falls back to the full logits otherwise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qlorakit.core.errors import ConfigError, DataError, ModelError
from qlorakit.data.render import IGNORE_INDEX
from qlorakit.lora.modules_to_save import ModulesToSaveWrapper
from qlorakit.models.load import unwrap_model

# One block of fp32 logits is chunk_tokens x chunk_vocab x 4 bytes = 16 MB; the backward holds about two
# such blocks (probabilities and their compute-dtype copy). Matmuls of 1024 x H x 4096 stay efficient.
DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_CHUNK_VOCAB = 4096
_HEAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32. logits [B, T, V], labels [B, T] (-100 = ignored) -> []."""
    shifted = logits[:, :-1, :].flatten(0, 1).float()
    targets = labels[:, 1:].flatten()
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def scored_tokens(labels: torch.Tensor) -> int:
    """Label tokens that contribute to the loss (after the next-token shift). labels [B, T] -> count."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(`token_loss_sum` as an fp64 CPU scalar, `scored_tokens`): batches combine into a token-weighted mean.

    logits [B, T, V] (position t predicts token t+1), labels [B, T] aligned with the input ids.
    """
    return token_loss_sum(logits, labels).double().cpu(), scored_tokens(labels)


# ---------------------------------------------------------------------------------------------------------
# The fused maths.


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # The blocks run in an explicit compute dtype; autocast must not recast the matmuls behind our back.
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(device: torch.device) -> torch.dtype:
    """The head matmul's dtype: autocast's when it is on (as `lm_head` under autocast), else fp32."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.float32


def _block_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """h [n, H], w [v, H], b [v] or None, all in the compute dtype -> fp32 logits [n, v] (a fresh tensor)."""
    z = h @ w.T if b is None else torch.addmm(b, h, w.T)
    return z.float() if z.dtype != torch.float32 else z


def _vocab_blocks(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, chunk: int
) -> Iterator:
    """(v0, v1, w [v, H], b [v] | None) in `dtype`: only one block is ever cast, never the whole weight."""
    for v0 in range(0, weight.shape[0], chunk):
        v1 = min(weight.shape[0], v0 + chunk)
        b = bias[v0:v1].to(dtype) if bias is not None else None
        yield v0, v1, weight[v0:v1].to(dtype), b


def _target_columns(t: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t [n] targets -> (in this vocab block [n] bool, column within the block [n, 1], clamped when outside)."""
    hit = (t >= v0) & (t < v1)
    return hit, (t - v0).clamp(0, v1 - v0 - 1)[:, None]


def _logsumexp_and_target(
    h: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunks: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [n, H] (compute dtype), t [n] -> logsumexp [n] fp32 and target logit [n] fp32 (online over vocab)."""
    n, (chunk_tokens, chunk_vocab) = h.shape[0], chunks
    lse = torch.full((n,), -math.inf, dtype=torch.float32, device=h.device)
    picked = torch.zeros(n, dtype=torch.float32, device=h.device)
    for v0, v1, w, b in _vocab_blocks(weight, bias, h.dtype, chunk_vocab):
        for c0 in range(0, n, chunk_tokens):
            c1 = min(n, c0 + chunk_tokens)
            z = _block_logits(h[c0:c1], w, b)
            hit, col = _target_columns(t[c0:c1], v0, v1)
            picked[c0:c1] += torch.where(hit, z.gather(1, col).squeeze(1), 0.0)
            lse[c0:c1] = torch.logaddexp(lse[c0:c1], torch.logsumexp(z, dim=1))
    return lse, picked


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc [m, k] fp32 += a [m, j] @ b [j, k]; 16-bit products are rounded as a 16-bit matmul would be."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        acc += (a @ b).float()


def _head_gradients(
    h: torch.Tensor,
    t: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
    chunks: tuple[int, int],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of scale * (summed loss): for h [n, H] as fp32 [n, H], for weight [V, H] and bias [V] in
    their dtypes; None where `needs` says no.

    The weight gradient is accumulated one vocab block at a time in fp32 and stored in the weight's dtype,
    so a 16-bit head never needs a full fp32 gradient buffer.
    """
    (n, dim), (chunk_tokens, chunk_vocab), (need_h, need_w, need_b) = h.shape, chunks, needs
    fp32 = torch.float32
    grad_h = torch.zeros(n, dim, dtype=fp32, device=h.device) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=fp32, device=h.device) if need_b else None
    for v0, v1, w, b in _vocab_blocks(weight, bias, h.dtype, chunk_vocab):
        block_w = torch.zeros(v1 - v0, dim, dtype=fp32, device=h.device) if need_w else None
        for c0 in range(0, n, chunk_tokens):
            c1 = min(n, c0 + chunk_tokens)
            # softmax - one-hot, times the incoming gradient, computed in place in the logits block
            p = _block_logits(h[c0:c1], w, b).sub_(lse[c0:c1, None]).exp_()
            hit, col = _target_columns(t[c0:c1], v0, v1)
            p.scatter_add_(1, col, -hit.to(fp32)[:, None]).mul_(scale)
            pc = p.to(h.dtype)
            if grad_h is not None:
                _add_product(grad_h[c0:c1], pc, w)
            if block_w is not None:
                _add_product(block_w, pc.T, h[c0:c1])
            if grad_b is not None:
                grad_b[v0:v1] += p.sum(0)
        if grad_w is not None:
            grad_w[v0:v1].copy_(block_w)
    return grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i [logsumexp(h_i W^T + b) - (h_i W^T + b)[t_i]] over tokens with t_i != -100."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype, chunk_tokens, chunk_vocab):  # noqa: ANN001
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        all_rows = rows.numel() == targets.numel()
        t = targets if all_rows else targets[rows]
        low, high = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
        if low < 0 or high >= weight.shape[0]:
            bad = low if low < 0 else high
            raise DataError(
                f"labels hold token id {bad}, outside the output head's {weight.shape[0]} rows (ids 0.."
                f"{weight.shape[0] - 1}, or -100 to ignore); the tokenizer and the model do not match"
            )
        chunks = (chunk_tokens, chunk_vocab)
        with _no_autocast(hidden.device):
            h = (hidden if all_rows else hidden[rows]).to(compute_dtype)
            lse, picked = _logsumexp_and_target(h, t, weight, bias, chunks)
        # Saved: references to the inputs, the [n] logsumexp and the kept rows; no logits.
        ctx.save_for_backward(hidden, weight, bias, t, None if all_rows else rows, lse)
        ctx.compute_dtype, ctx.chunks = compute_dtype, chunks
        return (lse - picked).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001
        hidden, weight, bias, t, rows, lse = ctx.saved_tensors
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        if not any(needs):
            return None, None, None, None, None, None, None
        with _no_autocast(hidden.device):
            h = (hidden if rows is None else hidden[rows]).to(ctx.compute_dtype)
            scale = grad_out.to(torch.float32)
            grad_h, grad_w, grad_b = _head_gradients(h, t, lse, scale, weight, bias, needs, ctx.chunks)
        if grad_h is not None:
            if rows is None:
                grad_h = grad_h.to(hidden.dtype)
            else:
                grad_h = torch.zeros_like(hidden).index_copy_(0, rows, grad_h.to(hidden.dtype))
        return grad_h, grad_w, grad_b, None, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
) -> torch.Tensor:
    """`F.cross_entropy((hidden @ weight.T + bias).float(), targets, ignore_index=-100, reduction="sum")`
    without materialising the logits.

    hidden [N, H] (any float dtype; its gradient comes back in that dtype), weight [V, H] and bias [V]
    (fp32/bf16/fp16; gradients only when they require grad), targets [N] int64 (-100 = ignored) -> [] fp32.
    The head matmuls run in fp32, or in the autocast dtype when autocast is on for hidden's device (as
    `nn.Linear` does under autocast); logsumexp and softmax are always fp32. Transient memory is a few
    [chunk_tokens, chunk_vocab] fp32 blocks plus [n_kept, H] copies of the kept rows of hidden.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ModelError(
            f"the fused head loss needs hidden [N, H] and weight [V, H]; got hidden {list(hidden.shape)} "
            f"and weight {list(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise DataError(
            f"targets must be int64 [{hidden.shape[0]}]; got {targets.dtype} {list(targets.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ModelError(f"the head bias has shape {list(bias.shape)}, its weight {list(weight.shape)}")
    if weight.dtype not in _HEAD_DTYPES or not hidden.is_floating_point():
        raise ModelError(f"the fused head loss needs a float head weight, got {weight.dtype}")
    if chunk_tokens < 1 or chunk_vocab < 1:
        raise ConfigError(f"chunk_tokens and chunk_vocab must be >= 1, got {chunk_tokens} and {chunk_vocab}")
    dtype = _compute_dtype(hidden.device)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, dtype, chunk_tokens, chunk_vocab)


# ---------------------------------------------------------------------------------------------------------
# Model-level entry point.

# Causal LM classes whose forward is `logits = self.lm_head(decoder(...).last_hidden_state)` with nothing
# applied to the logits afterwards (checked against their transformers source); class name -> model_type.
FUSED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "GPT2LMHeadModel": "gpt2",
}
# Config fields that signal logits rescaled or capped after the head (Gemma 2/3, Cohere, Granite, muP).
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "mup_width_multiplier",
    "width_multiplier",
)


def _plain(module: nn.Module) -> bool:
    """No forward hooks and no patched forward (e.g. accelerate's device hooks): bypassing it is exact."""
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module))


def fused_output_head(net: nn.Module) -> nn.Linear | None:
    """The `nn.Linear` whose weight the fused loss may use in place of `net.lm_head`, or None.

    None (the full-logits path) for any architecture outside FUSED_ARCHITECTURES, configs with logit
    post-processing, and heads other than a plain `nn.Linear` or a modules_to_save wrapper around one
    (LoRA on the head, 4-bit heads, hooked or tensor-subclass weights).
    """
    cls = type(net)
    model_type = FUSED_ARCHITECTURES.get(cls.__name__)
    if model_type is None or cls.__module__ != f"transformers.models.{model_type}.modeling_{model_type}":
        return None
    if any(getattr(net.config, key, None) is not None for key in _LOGIT_POSTPROCESSING):
        return None
    head = net._modules.get("lm_head")
    if isinstance(head, ModulesToSaveWrapper):
        head = head.active_module() if _plain(head) else None
    if type(head) is not nn.Linear or not _plain(head):
        return None
    weight = head.weight
    if weight.dtype not in _HEAD_DTYPES or type(weight.data) is not torch.Tensor:
        return None
    return head


class _Passthrough(nn.Module):
    """Stands in for the output head during one forward: returns the hidden states it is given."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextlib.contextmanager
def _head_bypassed(net: nn.Module) -> Iterator[None]:
    # The model (and a DDP wrapper around it) still runs its own forward, so gradient synchronisation,
    # gradient checkpointing and mask handling are unchanged; only the head is skipped.
    head = net._modules["lm_head"]
    net.lm_head = _Passthrough()
    try:
        yield
    finally:
        net.lm_head = head


def causal_lm_loss_sum(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
) -> torch.Tensor:
    """Summed next-token loss of a causal LM (optionally DDP-wrapped) = `token_loss_sum(model(**inputs)
    .logits, labels)`, fused when `fused_output_head` allows it.

    inputs: the model's keyword inputs (input_ids [B, T], attention_mask [B, T] or a [B, 1, T, T] float
    mask, position_ids ...), labels [B, T] (-100 = ignored) on the model's device -> [] fp32. Call it
    inside the autocast context the forward should run in.
    """
    head = fused_output_head(unwrap_model(model))
    if head is None:
        return token_loss_sum(model(**inputs, use_cache=False).logits, labels)
    with _head_bypassed(unwrap_model(model)):
        hidden = model(**inputs, use_cache=False).logits  # [B, T, H]: the head was a passthrough
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts label t + 1
    return linear_cross_entropy_sum(
        hidden.flatten(0, 1),
        head.weight,
        targets.flatten(),
        head.bias,
        chunk_tokens=chunk_tokens,
        chunk_vocab=chunk_vocab,
    )
