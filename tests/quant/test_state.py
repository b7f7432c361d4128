"""QuantState and its checkpoint keys: equal to bitsandbytes `as_dict(packed=True)`, round trips, bad files."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open

from qlorakit.core.atomic import atomic_save_safetensors
from qlorakit.core.errors import CheckpointError, QuantizationError
from qlorakit.quant import (
    NF4_CODE,
    NestedState,
    QuantState,
    dequantize_4bit,
    dynamic_map,
    quantize_4bit,
    state_from_tensors,
    state_to_tensors,
)

GOLDEN = Path(__file__).with_name("golden")
PREFIX = "model.layers.0.self_attn.q_proj."


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same_tensors(ours: dict, theirs: dict, ordered: bool = True) -> None:
    if ordered:
        assert list(ours) == list(theirs), "same keys in the same order"
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        a, b = ours[key], theirs[key]
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{key}: {a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}"
        )
        assert raw(a) == raw(b), f"{key}: bytes differ"


def weight(shape=(48, 80), dtype=torch.bfloat16, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


@pytest.fixture(autouse=True)
def _seed():
    """Unseeded draws in a test are reproducible too."""
    torch.manual_seed(0)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_tensors_equal_bitsandbytes_as_dict(dtype, quant_type, double_quant):
    F = pytest.importorskip("bitsandbytes.functional")
    A = weight(dtype=dtype)
    their_packed, theirs = F.quantize_4bit(
        A, blocksize=64, compress_statistics=double_quant, quant_type=quant_type
    )
    expected = {f"{PREFIX}weight": their_packed}
    expected.update({f"{PREFIX}weight.{k}": v for k, v in theirs.as_dict(packed=True).items()})
    packed, state = quantize_4bit(A, 64, quant_type, double_quant)
    ours = state_to_tensors(PREFIX, packed, state)
    assert_same_tensors(ours, expected)
    qs_key = f"{PREFIX}weight.quant_state.bitsandbytes__{quant_type}"
    meta = json.loads(raw(ours[qs_key]))
    assert meta["dtype"] == str(dtype).removeprefix("torch.") and meta["shape"] == [48, 80]
    assert ("nested_offset" in meta) == double_quant


@pytest.fixture
def eager_bnb():
    """bitsandbytes with torch.compile off (its compiled dequantization is eager-identical, just slow to build)."""
    F = pytest.importorskip("bitsandbytes.functional")
    config = torch._dynamo.config
    before = config.disable
    config.disable = True
    yield F
    config.disable = before


@pytest.mark.parametrize("double_quant", [True, False])
def test_bitsandbytes_reads_our_tensors(eager_bnb, double_quant):
    F = eager_bnb
    A = weight((33, 71), torch.float16, seed=1)  # 2343 elements: a partial last block
    packed, state = quantize_4bit(A, 128, "nf4", double_quant)
    tensors = state_to_tensors("", packed, state)
    qs_dict = {k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"}
    theirs = F.QuantState.from_dict(qs_dict, device=torch.device("cpu"))
    assert theirs.blocksize == 128 and theirs.dtype == torch.float16 and theirs.shape == (33, 71)
    out = F.dequantize_4bit(tensors["weight"], theirs)
    assert torch.equal(out.reshape(-1), dequantize_4bit(packed, state).reshape(-1))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_through_a_safetensors_file(tmp_path, quant_type, double_quant):
    A = weight((3, 7, 11), torch.float32, seed=2)  # odd count, 3-D
    packed, state = quantize_4bit(A, 32, quant_type, double_quant)
    file = atomic_save_safetensors(state_to_tensors(PREFIX, packed, state), tmp_path / "model.safetensors")
    packed2, state2 = state_from_tensors(PREFIX, load_file(str(file)), source=str(file))
    assert torch.equal(packed2, packed) and packed2.shape == ((A.numel() + 1) // 2, 1)
    assert state2.shape == A.shape and state2.dtype == A.dtype and state2.blocksize == 32
    assert state2.quant_type == quant_type and torch.equal(state2.absmax, state.absmax)
    if double_quant:
        assert state2.nested.offset == state.nested.offset and state2.nested.blocksize == 256
        assert torch.equal(state2.nested.absmax, state.nested.absmax)
    assert torch.equal(dequantize_4bit(packed2, state2), dequantize_4bit(packed, state))
    assert_same_tensors(state_to_tensors(PREFIX, packed2, state2), state_to_tensors(PREFIX, packed, state))


@pytest.mark.parametrize("name", ["state_nf4_dq_bf16", "state_fp4_fp16"])
def test_golden_bitsandbytes_state_dicts(name):
    """Tensors saved by bitsandbytes: read them, and write the same bytes back from the same input."""
    path = GOLDEN / f"{name}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        prefix = f.metadata()["prefix"]
    tensors = load_file(str(path))
    A = tensors.pop("input")
    packed, state = state_from_tensors(prefix, tensors, source=str(path))
    assert state.shape == A.shape and state.dtype == A.dtype
    # the stored weight decodes to a close approximation of the input
    err = (dequantize_4bit(packed, state).float() - A.float()).abs().max()
    assert err <= A.float().abs().max() * 0.15
    ours = state_to_tensors(prefix, *quantize_4bit(A, 64, state.quant_type, state.nested is not None))
    assert_same_tensors(ours, tensors, ordered=False)  # safetensors files store keys sorted


def test_quant_storage_bytes_are_accepted():
    F = pytest.importorskip("bitsandbytes.functional")
    A = weight((16, 64), torch.bfloat16, seed=3)
    their_packed, theirs = F.quantize_4bit(A, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    tensors = {"weight": their_packed, **{f"weight.{k}": v for k, v in theirs.as_dict(packed=True).items()}}
    assert tensors["weight"].dtype == torch.bfloat16
    packed, state = state_from_tensors("", tensors)
    assert packed.dtype == torch.uint8 and packed.shape == (512, 1)
    assert torch.equal(dequantize_4bit(packed, state), F.dequantize_4bit(their_packed, theirs))


def test_quant_state_methods():
    A = weight((10, 300), torch.float16, seed=4)  # 3000 elements: 47 blocks of 64
    packed, state = quantize_4bit(A, 64, "nf4", True)
    assert state.numel == 3000 and state.nblocks == 47
    assert state.absmax.dtype == torch.uint8 and state.nested.absmax.shape == (1,)
    real = state.real_absmax()
    _, plain = quantize_4bit(A, 64, "nf4", False)
    # double quantization keeps the scales within a fraction of a percent of the originals
    torch.testing.assert_close(real, plain.absmax, rtol=0.02, atol=0)
    moved = state.to("meta")
    assert moved.absmax.device.type == "meta" and moved.nested.code.device.type == "meta"
    assert state.absmax.device.type == "cpu", "to() returns a copy, the state is frozen"
    with pytest.raises(AttributeError):
        state.blocksize = 128


def test_real_absmax_equals_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    A = torch.randn(600, 64, generator=torch.Generator().manual_seed(5)) * torch.logspace(-2, 1, 64)
    _, theirs = F.quantize_4bit(A, blocksize=64, compress_statistics=True, quant_type="nf4")
    _, state = quantize_4bit(A, 64, "nf4", True)
    expected = F.dequantize_blockwise(theirs.absmax, quant_state=theirs.state2) + theirs.offset
    assert torch.equal(state.real_absmax().view(torch.int32), expected.view(torch.int32))


def test_inconsistent_state_is_rejected():
    absmax = torch.ones(2)
    with pytest.raises(QuantizationError, match="absmax has 2 entries, expected 3"):
        QuantState(absmax, torch.Size([3, 64]), torch.float32, 64, "nf4", NF4_CODE)
    with pytest.raises(QuantizationError, match="blocksize 48"):
        QuantState(absmax, (2, 48), torch.float32, 48, "nf4", NF4_CODE)
    with pytest.raises(QuantizationError, match="absmax must be a 1-D torch.uint8"):
        nested = NestedState(torch.ones(1), dynamic_map())
        QuantState(absmax, (2, 64), torch.float32, 64, "nf4", NF4_CODE, nested)
    with pytest.raises(QuantizationError, match="quant_type 'int4'"):
        QuantState(absmax, (2, 64), torch.float32, 64, "int4", NF4_CODE)


def good_tensors(double_quant=True):
    packed, state = quantize_4bit(weight((8, 64), torch.bfloat16), 64, "nf4", double_quant)
    return state_to_tensors(PREFIX, packed, state)


QS = f"{PREFIX}weight.quant_state.bitsandbytes__nf4"


def with_json(tensors, **changes):
    meta = json.loads(raw(tensors[QS]))
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    return {**tensors, QS: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}


def expect_error(tensors, *fragments):
    with pytest.raises(CheckpointError) as info:
        state_from_tensors(PREFIX, tensors, source="shard-00001.safetensors")
    msg = str(info.value)
    assert "shard-00001.safetensors" in msg
    for fragment in fragments:
        assert fragment in msg, msg


@pytest.mark.parametrize(
    "suffix",
    ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map", QS],
)
def test_missing_key_is_named(suffix):
    key = suffix if suffix == QS else PREFIX + suffix
    tensors = {k: v for k, v in good_tensors().items() if k != key}
    expect_error(tensors, repr(key) if suffix != QS else "bitsandbytes__nf4", "missing key")


def test_wrong_dtype_and_shape_are_named():
    t = good_tensors()
    expect_error(
        {**t, f"{PREFIX}weight.absmax": t[f"{PREFIX}weight.absmax"].float()}, "weight.absmax'", "uint8"
    )
    expect_error({**t, f"{PREFIX}weight.quant_map": t[f"{PREFIX}weight.quant_map"][:8]}, "weight.quant_map'")
    expect_error({**t, f"{PREFIX}weight.nested_absmax": torch.ones(2)}, "weight.nested_absmax'", "[1]")
    # shape in the JSON inconsistent with the packed size
    expect_error(with_json(t, shape=[8, 66]), f"{PREFIX}weight'", "264 bytes", "disagree")
    # an unquantized weight where the packed one should be
    expect_error({**t, f"{PREFIX}weight": torch.zeros(8, 64, dtype=torch.bfloat16)}, f"{PREFIX}weight'")
    wrong_map = t[f"{PREFIX}weight.quant_map"].clone()
    wrong_map[3] += 1e-3
    expect_error({**t, f"{PREFIX}weight.quant_map": wrong_map}, "standard nf4 table")


def test_bad_json_is_named():
    t = good_tensors()
    expect_error({**t, QS: torch.tensor([0xFF, 0xFE, 0x00], dtype=torch.uint8)}, QS, "UTF-8 JSON")
    expect_error({**t, QS: torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)}, QS, "JSON object")
    expect_error({**t, QS: torch.tensor(list(b'{"quant_type": '), dtype=torch.uint8)}, QS, "valid UTF-8 JSON")
    expect_error({**t, QS: t[QS].float()}, QS, "uint8")
    expect_error(with_json(t, blocksize=None), "'blocksize'", "missing")
    expect_error(with_json(t, blocksize=48), "'blocksize'")
    expect_error(with_json(t, dtype="float64"), "'dtype'")
    expect_error(with_json(t, quant_type="fp4"), "'quant_type'")
    expect_error(with_json(t, shape=[8, -64]), "'shape'")
    expect_error(with_json(t, nested_offset=None), "'nested_offset'")
    expect_error(with_json(t, nested_offset="x"), "'nested_offset'")
    plain = good_tensors(double_quant=False)
    extra = {**plain, f"{PREFIX}weight.nested_absmax": torch.ones(1)}
    expect_error(extra, "nested_absmax'", "no nested_* fields")


def test_both_quant_types_present_is_an_error():
    t = good_tensors()
    t[f"{PREFIX}weight.quant_state.bitsandbytes__fp4"] = t[QS]
    expect_error(t, "both nf4 and fp4")
