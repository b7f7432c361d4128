"""DoRA (weight-decomposed low-rank adaptation) maths, as PEFT computes it.

DoRA rescales each output row of the adapted weight `W + s * B @ A` to a learned magnitude `m`:

    W' = diag(m / ||W + s * B @ A||_row) @ (W + s * B @ A)

so `y = W' x = (m / n - 1) * (W x) + (m / n) * s * B A x + W x` with `n` the row norm. Following the DoRA
paper (section 4.3) and PEFT, `n` is treated as a constant (detached) so it gets no gradient.
"""

from __future__ import annotations

import torch
from torch import nn


def dora_weight_norm(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Row L2 norm of `weight + scaling * lora_B @ lora_A`, in fp32, without forming `lora_B @ lora_A`.

    weight [out, in], lora_A [r, in], lora_B [out, r] -> [out] fp32.
    Expands ||w + s b A||^2 = ||w||^2 + 2 s <b, (W A^T)_row> + s^2 b (A A^T) b^T, which needs only
    [out, r] and [r, r] intermediates instead of a second [out, in] matrix.
    """
    w = weight.float()
    a = lora_A.float()
    b = lora_B.float()
    wa = w @ a.T  # [out, r]
    aa = a @ a.T  # [r, r]
    sq = torch.linalg.vector_norm(w, dim=1).square()
    sq = sq + (2.0 * scaling) * (b * wa).sum(dim=1) + (scaling * scaling) * ((b @ aa) * b).sum(dim=1)
    return sq.clamp_min(0.0).sqrt()


def dora_output(
    base_result: torch.Tensor,
    lora_result: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The DoRA correction to add to the base layer output.

    base_result [..., out] = W x (no bias), lora_result [..., out] = B A x (unscaled), magnitude [out],
    weight_norm [out] (treated as a constant) -> [..., out] = (m/n - 1) W x + (m/n) s B A x.
    """
    scale = (magnitude / weight_norm.detach()).to(lora_result.dtype)
    return (scale - 1) * base_result + scale * lora_result * scaling


def dora_merged_weight(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, weight_norm: torch.Tensor
) -> torch.Tensor:
    """The merged DoRA weight `(m / n)[:, None] * (W + delta)`; all [out, in] except m, n [out]."""
    factor = (magnitude / weight_norm).to(weight.dtype).view(-1, 1)
    return factor * (weight + delta.to(weight.dtype))


def dora_unmerged_weight(
    merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, weight_norm: torch.Tensor
) -> torch.Tensor:
    """Inverse of `dora_merged_weight`: `merged / (m / n)[:, None] - delta`."""
    factor = (magnitude / weight_norm).to(merged.dtype).view(-1, 1)
    return merged / factor - delta.to(merged.dtype)


class DoraMagnitude(nn.Module):
    """Holds the trainable magnitude vector `weight` [out] (PEFT keeps `lora_magnitude_vector.<name>.weight`)."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude.detach().float().clone(), requires_grad=True)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"
