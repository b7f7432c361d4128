"""The LoRA branch as pure functions: `base_out + scaling * B(A(dropout(x)))` without forming `B @ A`.

Memory is the point: autograd keeps only the LoRA input, the [tokens, r] intermediate and (with dropout)
a 1-bit keep-mask per element (`qlorakit.lora.dropout`), never an [out, in] matrix and never a second
full-precision copy of the dropped-out input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qlorakit.lora.dropout import dropout_project


def branch_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the LoRA branch computes in: the autocast dtype when autocast is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def lora_down(x: torch.Tensor, lora_A: torch.Tensor, dropout: float) -> torch.Tensor:
    """`dropout(x) @ A^T` in the branch dtype: x [..., in], A [r, in] -> [..., r]; dropout=0 means none."""
    dtype = branch_dtype(x)
    x, a = x.to(dtype), lora_A.to(dtype)
    if dropout > 0.0:
        return dropout_project(x, a, dropout)
    return F.linear(x, a)


def lora_forward(
    x: torch.Tensor,
    base_out: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """`base_out + scaling * (dropout(x) @ A^T) @ B^T`: x [..., in], base_out [..., out], A [r, in], B [out, r].

    The up-projection is fused with the addition (addmm, alpha=scaling): one [tokens, out] allocation and
    no separate scaling pass. Pass dropout=0 in eval mode.
    """
    h = lora_down(x, lora_A, dropout)  # [..., r]
    dtype = h.dtype
    out_features = lora_B.shape[0]
    if base_out.dtype == dtype:
        fused = torch.addmm(
            base_out.reshape(-1, out_features),
            h.reshape(-1, h.shape[-1]),
            lora_B.to(dtype).t(),
            alpha=scaling,
        )
        return fused.view(base_out.shape)
    return base_out + (F.linear(h, lora_B.to(dtype)) * scaling).to(base_out.dtype)
