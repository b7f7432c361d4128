"""Plain HF folders: shard layout, loading in transformers, atomicity, export from a 4-bit folder."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.tiny import make_tiny_llama
from qlorakit.core.dtypes import parse_dtype, parse_size
from qlorakit.core.errors import ConfigError
from qlorakit.export.hf import ShardWriter, export_hf, write_hf_files

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize(
    ("text", "value"),
    [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("1GiB", 2**30), ("10KiB", 10240), ("123", 123), (77, 77)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "2 parsecs", "-1GB", "0", "GB"])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError, match="max shard size"):
        parse_size(bad, "max shard size")


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    with pytest.raises(ConfigError, match="bf16, fp16, fp32"):
        parse_dtype("int8")


def test_single_shard_folder_loads_in_transformers(tmp_path, tiny_tokenizer):
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    out = tmp_path / "dense"
    out.mkdir()
    summary = write_hf_files(
        out, model.state_dict().items(), config=model.config, tokenizer=tiny_tokenizer, dtype=torch.float32
    )
    assert summary.files == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert summary.numel == sum(p.numel() for p in model.state_dict().values())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    assert (out / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_sharding_writes_index_and_loads(tmp_path):
    model = make_tiny_llama()
    out = tmp_path / "sharded"
    out.mkdir()
    limit = 40_000  # bytes: below the size of one bf16 embedding matrix (320*64*2 = 40960)
    summary = write_hf_files(
        out,
        model.state_dict().items(),
        config=model.config,
        tokenizer=None,
        dtype=torch.bfloat16,
        max_shard_size=limit,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 3 and shards == summary.files
    assert all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in model.state_dict().values())
    # No shard but those holding a single oversized tensor exceeds the limit.
    from safetensors import safe_open

    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as fh:
            sizes = [fh.get_tensor(k).numel() * 2 for k in fh.keys()]  # noqa: SIM118
        assert sum(sizes) <= limit or len(sizes) == 1
    assert summary.peak_buffer_bytes <= max(limit, 320 * 64 * 2)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.to(torch.bfloat16), rtol=0, atol=0)


def test_shard_writer_rejects_duplicate_names(tmp_path):
    writer = ShardWriter(tmp_path, 1000, torch.float32)
    writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="twice"):
        writer.add("a", torch.zeros(2))


def test_failure_midway_leaves_no_folder(tmp_path, tiny_tokenizer):
    from qlorakit.core.atomic import atomic_directory

    model = make_tiny_llama()
    out = tmp_path / "never"

    def tensors():
        items = list(model.state_dict().items())
        yield from items[:5]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"), atomic_directory(out) as tmp:
        write_hf_files(
            tmp,
            tensors(),
            config=model.config,
            tokenizer=tiny_tokenizer,
            dtype=torch.float32,
            max_shard_size=1000,
        )
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_hf_from_4bit_folder(tmp_path, tiny_tokenizer):
    """A 4-bit folder becomes a dense folder whose weights are exactly the dequantized NF4 weights."""
    from qlorakit.quant.convert import quantize_model, save_quantized
    from qlorakit.quant.loading import load_quantized
    from qlorakit.quant.settings import QuantSettings

    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    quantize_model(model, QuantSettings(compute_dtype=torch.float32))
    q_dir = tmp_path / "q4"
    save_quantized(model, tiny_tokenizer, q_dir)
    report = export_hf(q_dir, tmp_path / "dense", dtype="fp32", max_shard_size="30KB")
    assert len(report.files) > 1
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert "quantization_config" not in dense.config.to_dict()
    quantized = load_quantized(q_dir, compute_dtype=torch.float32)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 10))
    torch.testing.assert_close(_logits(dense, ids), _logits(quantized, ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="dtype"):
        export_hf(q_dir, tmp_path / "x", dtype="int4")
    assert not (tmp_path / "x").exists()
