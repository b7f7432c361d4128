"""Write the golden vectors in tests/quant/golden/ with the real bitsandbytes (0.50.2, CPU).

Run: /work/venv/bin/python tests/quant/make_golden.py
Each file holds an input, what bitsandbytes made of it, and metadata describing the call; the tests in this
folder check qlorakit against them without bitsandbytes installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qlorakit.core.atomic import atomic_save_safetensors

GOLDEN = Path(__file__).with_name("golden")


def edge_input() -> torch.Tensor:
    """fp32 [4 * 64 + 21]: exact NF4 midpoints (ties), an all-zero block, tiny values, a zero partial block."""
    from qlorakit.quant.codes import NF4_CODE

    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    ties = torch.cat([torch.tensor([1.0]), mids, -mids, NF4_CODE, torch.zeros(64 - 1 - 30 - 16)])
    zeros = torch.zeros(64)
    tiny = torch.linspace(-1e-30, 1e-30, 64)
    mixed = torch.linspace(-3.0, 2.0, 64)
    return torch.cat([ties, zeros, tiny, mixed, torch.zeros(21)])


def cases() -> list[dict]:
    g = torch.Generator().manual_seed(1234)

    def randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        scale = torch.rand(shape[-1], generator=g) * 2 + 0.05
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    spiky = randn(301, dtype=torch.float16)
    spiky[32:64] = 0  # a whole zero block at blocksize 32
    spiky[100] = 40.0
    return [
        dict(name="nf4_bf16_bs64_dq_2d", A=randn(24, 40, dtype=torch.bfloat16), bs=64, qt="nf4", dq=True),
        dict(
            name="fp4_fp32_bs128_3d_odd", A=randn(3, 5, 37, dtype=torch.float32), bs=128, qt="fp4", dq=False
        ),
        dict(name="nf4_fp16_bs32_dq_1d_zero_block", A=spiky, bs=32, qt="nf4", dq=True),
        dict(name="fp4_bf16_bs256_dq_2d", A=randn(16, 96, dtype=torch.bfloat16), bs=256, qt="fp4", dq=True),
        dict(
            name="nf4_bf16_bs4096_dq_partial", A=randn(4608, dtype=torch.bfloat16), bs=4096, qt="nf4", dq=True
        ),
        dict(name="nf4_fp32_bs64_edge", A=edge_input(), bs=64, qt="nf4", dq=True),
        dict(name="fp4_fp32_bs64_edge", A=edge_input(), bs=64, qt="fp4", dq=False),
        # more than 256 blocks: two nested blocks, the second partial (packed/state only, no dequant)
        dict(
            name="nf4_fp16_bs32_dq_many_blocks",
            A=randn(96, 100, dtype=torch.float16),
            bs=32,
            qt="nf4",
            dq=True,
        ),
    ]


def write_case(case: dict) -> Path:
    import bitsandbytes
    import bitsandbytes.functional as F

    A, bs, qt, dq = case["A"], case["bs"], case["qt"], case["dq"]
    packed, state = F.quantize_4bit(
        A, blocksize=bs, compress_statistics=dq, quant_type=qt, quant_storage=torch.uint8
    )
    tensors = {"input": A, "packed": packed, "absmax": state.absmax}
    meta = {
        "quant_type": qt,
        "blocksize": str(bs),
        "double_quant": json.dumps(dq),
        "bitsandbytes": bitsandbytes.__version__,
    }
    if dq:
        tensors["nested_absmax"] = state.state2.absmax
        tensors["nested_code"] = state.state2.code
        meta["nested_offset"] = repr(state.offset.item())
    if A.numel() <= 5000:
        absmax = state.absmax
        if dq:
            absmax = F.dequantize_blockwise(state.absmax, quant_state=state.state2) + state.offset
        # bitsandbytes' own plain-torch dequantization (its CPU C++ kernel agrees on these shapes)
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        code = F.get_4bit_type(qt, device="cpu")
        compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
        flat = compute(packed.reshape(-1), absmax, code, bs, state.shape, A.dtype)
        tensors["dequant"] = flat.reshape(A.shape)
    path = GOLDEN / f"{case['name']}.safetensors"
    return atomic_save_safetensors(tensors, path, metadata=meta)


def write_state_dict_case(name: str, prefix: str, A: torch.Tensor, qt: str, dq: bool) -> Path:
    """A weight as transformers + bitsandbytes save it: `prefix + "weight"` and `QuantState.as_dict(packed=True)`."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(A, blocksize=64, compress_statistics=dq, quant_type=qt)
    tensors = {"input": A, f"{prefix}weight": packed}
    for key, value in state.as_dict(packed=True).items():
        tensors[f"{prefix}weight.{key}"] = value
    return atomic_save_safetensors(tensors, GOLDEN / f"{name}.safetensors", metadata={"prefix": prefix})


def vectors_dynamic8() -> Path:
    """The 8-bit dynamic quantizer alone (blocksize 256): 700 values, one all-zero nested block."""
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(99)
    values = torch.randn(700, generator=g) * 0.01
    values[256:512] = 0
    values[600] = 0.5
    codes, state = F.quantize_blockwise(values, blocksize=256)
    tensors = {"values": values, "codes": codes, "absmax": state.absmax, "code": state.code}
    return atomic_save_safetensors(tensors, GOLDEN / "dynamic8_bs256.safetensors")


def main() -> None:
    torch.manual_seed(0)
    GOLDEN.mkdir(exist_ok=True)
    written = [write_case(c) for c in cases()]
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(32, 64, generator=g) * 0.02).to(torch.bfloat16)
    written.append(
        write_state_dict_case("state_nf4_dq_bf16", "model.layers.0.mlp.down_proj.", w, "nf4", True)
    )
    written.append(
        write_state_dict_case("state_fp4_fp16", "lm.h.3.attn.c_attn.", w.to(torch.float16), "fp4", False)
    )
    written.append(vectors_dynamic8())
    for path in written:
        print(f"{path.stat().st_size:7d} bytes  {path}")


if __name__ == "__main__":
    main()
