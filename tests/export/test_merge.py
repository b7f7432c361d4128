"""Merging adapters into dense checkpoints: maths vs PEFT, logits vs the adapted model, sharding, errors."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.tiny import make_adapter as _make_adapter
from helpers.tiny import make_tiny_llama
from qlorakit.config import QuantConfig
from qlorakit.core.errors import CheckpointError, ConfigError, FormatError
from qlorakit.core.outputs import OutputError
from qlorakit.export.merge import merge_adapter, sample_inputs
from qlorakit.lora.layer import merge_lora_weight

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest
FP32 = QuantConfig(compute_dtype="float32")


make_adapter = functools.partial(_make_adapter, strength=0.05)  # this file's adapters: B ~ N(0, 0.05^2)


def adapted_logits(model_dir, adapter_dir, ids, *, four_bit: bool):
    from qlorakit.lora import load_adapter
    from qlorakit.models.load import load_base

    model, _ = load_base(model_dir, four_bit=four_bit, quant=FP32)
    load_adapter(model, adapter_dir)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def dense_logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture
def ids(tiny_tokenizer):
    return torch.randint(0, len(tiny_tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_maths_matches_peft(use_dora):
    """`merge_lora_weight` gives the weight PEFT's own merge_and_unload writes (LoRA and DoRA)."""
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama()
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=use_dora)
    )
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    torch.manual_seed(3)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05)
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    a, b = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    m = layer.lora_magnitude_vector["default"].weight.detach().clone() if use_dora else None
    ours = merge_lora_weight(original, a, b, layer.scaling["default"], m)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(ours, merged.model.layers[0].self_attn.q_proj.weight, rtol=1e-5, atol=1e-6)
    assert (ours - original).abs().max() > 1e-3  # the adapter really changes the weight


def test_merge_nf4_base_matches_adapter_on_dequantized_base(tmp_path, tiny_model_dir, ids):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=1)
    report = merge_adapter(tiny_model_dir, adapter, tmp_path / "merged", to="fp32", quant=FP32)
    reference = adapted_logits(tiny_model_dir, adapter, ids, four_bit=True)
    merged = dense_logits(tmp_path / "merged", ids)
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-4)
    assert report.drift_max < 1e-3 and report.merged_layers == 14
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    # The merge is not a no-op: the merged model differs from the plain base.
    assert (merged - dense_logits(tiny_model_dir, ids)).abs().max() > 1e-2


def test_merge_original_base_matches_adapter_on_original_weights(tmp_path, tiny_model_dir, ids):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=2)
    report = merge_adapter(
        tiny_model_dir, adapter, tmp_path / "merged", base="original", to="fp32", quant=FP32
    )
    reference = adapted_logits(tiny_model_dir, adapter, ids, four_bit=False)
    torch.testing.assert_close(dense_logits(tmp_path / "merged", ids), reference, rtol=1e-4, atol=1e-4)
    assert report.source_drift_max < 1e-3
    # Against the adapter on the 4-bit base the original-weight merge drifts by the quantization error.
    assert report.drift_max > 10 * report.source_drift_max


def test_dora_merge_matches_adapter(tmp_path, tiny_model_dir, ids):
    adapter = make_adapter(tiny_model_dir, tmp_path / "dora", seed=3, use_dora=True)
    merge_adapter(tiny_model_dir, adapter, tmp_path / "merged", to="fp32", quant=FP32)
    reference = adapted_logits(tiny_model_dir, adapter, ids, four_bit=True)
    torch.testing.assert_close(dense_logits(tmp_path / "merged", ids), reference, rtol=1e-4, atol=1e-4)


def test_bf16_merge_with_small_shards(tmp_path, tiny_model_dir, tiny_tokenizer):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=4)
    report = merge_adapter(tiny_model_dir, adapter, tmp_path / "merged", max_shard_size="30KB", quant=FP32)
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4 and shards == report.files
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.dtype == torch.bfloat16
    # Every key of the original architecture, no LoRA or 4-bit leftovers.
    assert set(index["weight_map"]) == set(make_tiny_llama(vocab_size=model.config.vocab_size).state_dict())
    # The report's drift is measured on `sample_inputs`; recompute it from the loaded folder.
    inputs = sample_inputs(tiny_tokenizer, model.config.vocab_size)
    with torch.no_grad():
        merged = model(input_ids=inputs).logits.float()
    reference = adapted_logits(tiny_model_dir, adapter, inputs, four_bit=True)
    drift = float((merged - reference).abs().max())
    assert 0 < drift < 0.05  # bf16 rounding only
    assert report.drift_max == pytest.approx(drift, rel=1e-4)


def test_merge_to_nf4_warns_and_reports_drift(tmp_path, tiny_model_dir, tiny_tokenizer):
    from qlorakit.quant.loading import load_quantized

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=5)
    with pytest.warns(UserWarning, match="re-quantizing"):
        report = merge_adapter(tiny_model_dir, adapter, tmp_path / "merged4", to="nf4", quant=FP32)
    assert report.warnings and "warning" in report.summary()
    config = json.loads((tmp_path / "merged4" / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] is True
    model = load_quantized(tmp_path / "merged4", torch.float32)
    inputs = sample_inputs(tiny_tokenizer, model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=inputs).logits.float()
    reference = adapted_logits(tiny_model_dir, adapter, inputs, four_bit=True)
    drift = float((logits - reference).abs().max())
    assert drift > 0 and report.drift_max == pytest.approx(drift, rel=1e-3)


def test_adapter_for_another_base_fails_cleanly(tmp_path, tiny_tokenizer, tiny_model_dir):
    other_dir = tmp_path / "other"
    other = make_tiny_llama(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64)
    other.save_pretrained(other_dir)
    tiny_tokenizer.save_pretrained(other_dir)
    adapter = make_adapter(other_dir, tmp_path / "adapter", seed=6)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    with pytest.raises(FormatError, match="shape"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge_adapter(tiny_model_dir, adapter, out_parent / "merged", quant=FP32)
    assert list(out_parent.iterdir()) == []


def test_missing_or_corrupt_adapter_fails_cleanly(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=7)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        merge_adapter(tiny_model_dir, adapter, tmp_path / "merged", quant=FP32)
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        merge_adapter(tiny_model_dir, tmp_path / "nowhere", tmp_path / "merged", quant=FP32)
    assert not (tmp_path / "merged").exists()


def test_bad_arguments(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=8)
    with pytest.raises(ConfigError, match="nf4, original"):
        merge_adapter(tiny_model_dir, adapter, tmp_path / "m", base="fp8")
    with pytest.raises(ConfigError, match="bf16, fp16, fp32, nf4"):
        merge_adapter(tiny_model_dir, adapter, tmp_path / "m", to="int8")
    with pytest.raises(OutputError, match="would overwrite the input"):
        merge_adapter(tiny_model_dir, adapter, tiny_model_dir)
    with pytest.raises(ConfigError, match="max shard size"):
        merge_adapter(tiny_model_dir, adapter, tmp_path / "m", max_shard_size="lots")
    assert not (tmp_path / "m").exists()


def test_peak_memory_stays_near_one_shard(tmp_path, tiny_tokenizer):
    """The merge pass holds one shard (plus one layer) of merged weights, not a second model copy."""
    model = make_tiny_llama(
        vocab_size=len(tiny_tokenizer),
        hidden_size=256,
        intermediate_size=1024,
        num_layers=6,
        num_heads=8,
        num_kv_heads=4,
    )
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    adapter = make_adapter(model_dir, tmp_path / "adapter", seed=9)
    shard = 600_000
    report = merge_adapter(model_dir, adapter, tmp_path / "merged", max_shard_size=shard, quant=FP32)
    largest = 256 * 1024 * 2  # the biggest single tensor in bf16
    assert report.dense_bytes == report.params * 2
    assert report.peak_buffer_bytes <= shard + largest
    assert report.peak_buffer_bytes < report.dense_bytes / 4
    assert report.peak_rss_growth is not None
    # Resident memory grows by well under one dense copy while merging (allocator slack allowed).
    assert report.peak_rss_growth < report.dense_bytes * 0.75
