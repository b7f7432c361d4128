"""LoRA on a frozen linear layer (plain `nn.Linear` or 4-bit `Linear4bit`), with PEFT's names.

    y = base(x) + scaling * B(A(dropout(x))),   scaling = alpha / r   (or alpha / sqrt(r) with rsLoRA)

`B @ A` is never formed in the forward pass: the branch is two thin matmuls through the rank-r bottleneck,
so backward keeps only the input and the [tokens, r] intermediate alive, never an [out, in] matrix.
The adapter weights stay fp32 (the optimizer updates them in full precision); the branch is computed in
the input's dtype, or the autocast dtype when autocast is on.
"""

from __future__ import annotations

import math
from typing import Required, TypedDict, Unpack

import torch
import torch.nn.functional as F
from torch import nn

from qlorakit.core.errors import ConfigError, ModelError, QuantizationError
from qlorakit.lora.dora import (
    DoraMagnitude,
    dora_merged_weight,
    dora_output,
    dora_unmerged_weight,
    dora_weight_norm,
)
from qlorakit.lora.dropout import dropout
from qlorakit.lora.functional import branch_dtype, lora_forward
from qlorakit.quant.linear import Linear4bit

INITS = ("default", "gaussian")

# ---------------------------------------------------------------------------------------------------------
# Pure maths


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """`alpha / r`, or `alpha / sqrt(r)` with rsLoRA (rank-stabilised: the update keeps its size as r grows)."""
    if r <= 0:
        raise ConfigError(f"LoRA rank r must be a positive integer, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight update `scaling * B @ A`: lora_A [r, in], lora_B [out, r] -> [out, in] (fp32 or wider)."""
    dtype = torch.promote_types(torch.promote_types(lora_A.dtype, lora_B.dtype), torch.float32)
    return (lora_B.to(dtype) @ lora_A.to(dtype)) * scaling


def merge_lora_weight(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merged weight [out, in] in fp32.

    weight [out, in], lora_A [r, in], lora_B [out, r], magnitude [out] (DoRA) or None (LoRA).
    LoRA: `W + s * B @ A`. DoRA: `(m / n)[:, None] * (W + s * B @ A)` with n the row L2 norm of
    `W + s * B @ A` (PEFT's `get_weight_norm` along dim 1).
    """
    w = weight.float()
    delta = delta_weight(lora_A, lora_B, scaling).to(w.device)
    if magnitude is None:
        return w + delta
    norm = dora_weight_norm(w, lora_A, lora_B, scaling)
    return dora_merged_weight(w, delta, magnitude.float().to(w.device), norm)


def init_lora_weights(
    r: int, in_features: int, out_features: int, *, init: str, seed: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh fp32 CPU weights as PEFT initialises them: A [r, in], B [out, r] (zeros, so the adapter starts as a no-op).

    `default`: A ~ kaiming_uniform_(a=sqrt(5)) (nn.Linear's own init); `gaussian`: A ~ N(0, (1/r)^2).
    With a `seed` the draw uses a private generator, so the result does not depend on (or disturb) the
    global RNG; without one it uses the global RNG like PEFT.
    """
    if init not in INITS:
        raise ConfigError(f"LoRA init must be one of {', '.join(INITS)}, got {init!r}")
    generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    lora_A = torch.empty(r, in_features, dtype=torch.float32)
    if init == "default":
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
    else:
        nn.init.normal_(lora_A, std=1.0 / r, generator=generator)
    lora_B = torch.zeros(out_features, r, dtype=torch.float32)
    return lora_A, lora_B


# ---------------------------------------------------------------------------------------------------------
# The module


def base_kind(base: nn.Module) -> str:
    """`"linear"` for nn.Linear, `"4bit"` for Linear4bit; anything else is a ModelError."""
    if isinstance(base, nn.Linear):
        return "linear"
    if isinstance(base, Linear4bit):
        return "4bit"
    raise ModelError(
        f"LoRA wraps nn.Linear or qlorakit Linear4bit layers; got {type(base).__module__}.{type(base).__name__}. "
        "Leave this module out of target_modules (or add it to exclude_modules)."
    )


def base_weight(base: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base layer's dense weight [out, in] (dequantized for a 4-bit base), detached."""
    if base_kind(base) == "linear":
        w = base.weight.detach()
        return w if dtype is None else w.to(dtype)
    return base.dequantize(dtype).detach()


def _base_device(base: nn.Module) -> torch.device:
    if base_kind(base) == "linear":
        return base.weight.device
    return base.packed.device


class AdapterOptions(TypedDict, total=False):
    """The settings of one adapter, as `LoRALinear.add_adapter` takes them (defaults are there).

    The constructor takes the same keywords for its first adapter and hands them on unchanged, so the
    two signatures cannot drift apart.
    """

    r: Required[int]
    alpha: Required[float]
    dropout: float
    use_rslora: bool
    use_dora: bool
    init: str
    seed: int | None


class LoRALinear(nn.Module):
    """A frozen linear layer plus one or more named LoRA adapters (one active at a time).

    Attributes use PEFT's names so state-dict keys need no remapping: `base_layer`, `lora_A[name]` /
    `lora_B[name]` (nn.Linear without bias), `lora_dropout[name]`, `lora_magnitude_vector[name]` (DoRA).
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        adapter_name: str = "default",
        **adapter: Unpack[AdapterOptions],
    ) -> None:
        super().__init__()
        self._kind = base_kind(base)
        base.requires_grad_(False)  # the base is frozen; only the adapters (and what inject_lora says) train
        self.base_layer = base
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self._disabled = False
        self._merge_norms: dict[str, torch.Tensor] = {}
        self.train(base.training)  # new submodules (dropout) follow the wrapped layer's train/eval mode
        self.add_adapter(adapter_name, **adapter)

    # -- shape ------------------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    # -- adapters ---------------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "default",
        seed: int | None = None,
    ) -> None:
        """Add a fresh adapter (B = 0, so it starts as a no-op); it does not become active by itself."""
        if name in self.lora_A:
            raise ConfigError(
                f"adapter {name!r} already exists on this layer; delete it first or pick another name"
            )
        if not name or "." in name:
            raise ConfigError(f"adapter name must be non-empty and contain no '.', got {name!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout}")
        scaling = lora_scaling(r, alpha, use_rslora)
        lora_A, lora_B = init_lora_weights(r, self.in_features, self.out_features, init=init, seed=seed)
        device = _base_device(self.base_layer)
        a = nn.Linear(self.in_features, r, bias=False, device="meta")
        b = nn.Linear(r, self.out_features, bias=False, device="meta")
        a.weight = nn.Parameter(lora_A.to(device))
        b.weight = nn.Parameter(lora_B.to(device))
        self.lora_A[name] = a
        self.lora_B[name] = b
        # Identity when p == 0 (as PEFT); forward also skips the dropout call in eval mode.
        self.lora_dropout[name] = (nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()).train(
            self.training
        )
        self.scaling[name] = scaling
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.use_dora[name] = use_dora
        if use_dora:
            with torch.no_grad():
                norm = dora_weight_norm(
                    base_weight(self.base_layer, torch.float32), a.weight, b.weight, scaling
                )
            self.lora_magnitude_vector[name] = DoraMagnitude(norm)

    def set_adapter(self, name: str, *, missing_ok: bool = False) -> None:
        """Make `name` the adapter used by forward (the layer must not be merged).

        With `missing_ok` (used model-wide, where only some layers carry an adapter) a name this layer
        lacks is accepted and the layer then returns exactly its base output, as PEFT does.
        """
        if not (missing_ok and name not in self.lora_A):
            self._require(name)
        if self.merged_adapters and name not in self.merged_adapters:
            raise ModelError(
                f"cannot switch to adapter {name!r} while {self.merged_adapters} is merged; unmerge() first"
            )
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (unmerging it first); the active adapter moves to the first remaining one."""
        self._require(name)
        if len(self.lora_A) == 1:
            raise ModelError(
                f"cannot delete {name!r}: it is the only adapter on this layer; use the base layer itself instead"
            )
        if name in self.merged_adapters:
            self.unmerge()
        for container in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in container:
                del container[name]
        for table in (self.scaling, self.r, self.lora_alpha, self.use_dora):
            del table[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A.keys()))

    @property
    def disable_adapters(self) -> bool:
        return self._disabled

    @disable_adapters.setter
    def disable_adapters(self, value: bool) -> None:
        # A merged adapter lives inside the base weight, so "exactly the base output" requires unmerging.
        if value and self.merged_adapters:
            self.unmerge()
        self._disabled = bool(value)

    def _require(self, name: str) -> None:
        if name not in self.lora_A:
            raise ConfigError(
                f"no adapter named {name!r} on this layer (have: {', '.join(self.lora_A.keys())})"
            )

    # -- merge ------------------------------------------------------------------------------------------
    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """`scaling * B @ A` [out, in] fp32 for adapter `name` (default: the active one)."""
        name = name or self.active_adapter
        self._require(name)
        return delta_weight(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    def merge(self) -> None:
        """Fold the active adapter into the base weight (plain nn.Linear base only)."""
        if self._kind != "linear":
            raise QuantizationError(
                "cannot merge LoRA into a 4-bit base in place (re-quantizing would change the outputs); "
                "merge into a 16-bit copy of the dequantized weights with the export path instead"
            )
        name = self.active_adapter
        if name in self.merged_adapters:
            return
        if self.merged_adapters:
            raise ModelError(f"adapter {self.merged_adapters[0]!r} is already merged; unmerge() first")
        weight = self.base_layer.weight
        with torch.no_grad():
            delta = self.delta_weight(name)
            if self.use_dora[name]:
                norm = dora_weight_norm(
                    weight, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
                )
                self._merge_norms[name] = norm
                new = dora_merged_weight(weight.float(), delta, self.lora_magnitude_vector[name].weight, norm)
                weight.copy_(new.to(weight.dtype))
            else:
                weight.add_(delta.to(weight.dtype))
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo `merge()`; the base weight returns to its value before merging (within float rounding)."""
        if self._kind != "linear":
            raise QuantizationError("a 4-bit base is never merged in place, so there is nothing to unmerge")
        weight = self.base_layer.weight
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                delta = self.delta_weight(name)
                if self.use_dora[name]:
                    norm = self._merge_norms.pop(name)
                    old = dora_unmerged_weight(
                        weight.float(), delta, self.lora_magnitude_vector[name].weight, norm
                    )
                    weight.copy_(old.to(weight.dtype))
                else:
                    weight.sub_(delta.to(weight.dtype))

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        name = self.active_adapter
        if self._disabled or self.merged_adapters or name not in self.lora_A:
            return self.base_layer(x)
        result = self.base_layer(x)
        module = self.lora_dropout[name]
        p = module.p if isinstance(module, nn.Dropout) and self.training else 0.0  # no dropout work in eval
        if not self.use_dora[name]:
            return lora_forward(
                x, result, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p
            )
        x_in = dropout(x, p) if p > 0.0 else x
        return self._dora_forward(x_in, result, p > 0.0, name)

    def _dora_forward(
        self, x_in: torch.Tensor, result: torch.Tensor, dropped: bool, name: str
    ) -> torch.Tensor:
        lora_A = self.lora_A[name].weight
        lora_B = self.lora_B[name].weight
        scaling = self.scaling[name]
        with torch.no_grad():  # the norm is a constant for autograd (DoRA paper 4.3, PEFT)
            norm = dora_weight_norm(base_weight(self.base_layer, torch.float32), lora_A, lora_B, scaling)
        bias = self.base_layer.bias
        # With dropout, W @ dropout(x) goes through the base layer itself: a 4-bit base re-dequantizes in
        # backward instead of autograd keeping a dense [out, in] weight alive.
        base_result = self.base_layer(x_in) if dropped else result
        if bias is not None:
            base_result = base_result - bias.to(base_result.dtype)
        dtype = branch_dtype(x_in)
        lora_result = F.linear(F.linear(x_in.to(dtype), lora_A.to(dtype)), lora_B.to(dtype))
        extra = dora_output(base_result, lora_result, self.lora_magnitude_vector[name].weight, norm, scaling)
        return (result + extra).to(result.dtype)

    def extra_repr(self) -> str:
        parts = [
            f"{n}: r={self.r[n]}, scaling={self.scaling[n]:g}{', dora' if self.use_dora[n] else ''}"
            for n in self.r
        ]
        return f"active={self.active_adapter!r}, disabled={self._disabled}, " + "; ".join(parts)
