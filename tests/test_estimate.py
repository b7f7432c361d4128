"""The memory model against real parameter, gradient, optimizer and quantized-tensor bytes of tiny models."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import make_tiny_llama
from qlorakit.errors import ConfigError
from qlorakit.estimate import (
    ModelShape,
    advise,
    estimate_memory,
    format_bytes,
    parse_size,
    quantized_bytes,
)

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "max_position_embeddings": 4096,
}
LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def _tiny_models():
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    yield make_tiny_llama()
    yield make_tiny_llama(tie_word_embeddings=True, num_kv_heads=4)
    yield Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    yield GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128))


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("index", range(4))
def test_parameter_count_and_full_weights_match_real_models(index):
    model = list(_tiny_models())[index]
    shape = ModelShape.from_config(model.config.to_dict())
    assert shape.num_params() == sum(p.numel() for p in model.parameters())
    assert shape.num_param_tensors() == len(list(model.parameters()))
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        model = model.to(dtype)
        est = estimate_memory(shape, method="full", batch=1, seq=8, compute_dtype=name)
        assert est.components["weights"] == _param_bytes(model)
        assert est.trainable_params == shape.num_params()


def test_gradients_and_adamw_states_match_a_real_step():
    model = make_tiny_llama()
    model.train()
    shape = ModelShape.from_config(model.config.to_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 320, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    est = estimate_memory(shape, method="full", batch=2, seq=16, compute_dtype="float32")
    assert est.components["gradients"] == grad_bytes
    assert est.components["optimizer"] == state_bytes  # m, v and the fp32 step scalars; no master in fp32


def test_lora_adapters_gradients_and_optimizer_match_peft():
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama()
    shape = ModelShape.from_config(model.config.to_dict())
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        peft_model = get_peft_model(make_tiny_llama(), LoraConfig(r=8, target_modules=targets))
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-3)
        ids = torch.randint(0, 320, (1, 8))
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        est = estimate_memory(
            shape, method="lora", batch=1, seq=8, r=8, targets=targets, compute_dtype="float32"
        )
        assert est.trainable_params == sum(p.numel() for p in trainable)
        assert est.components["adapters"] == sum(p.numel() * 4 for p in trainable)
        assert est.components["gradients"] == sum(p.grad.numel() * 4 for p in trainable)
        assert est.components["optimizer"] == sum(
            t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
        )
        assert est.components["weights"] == _param_bytes(model)  # the frozen base, unchanged


def test_qlora_weights_and_constants_match_bitsandbytes():
    import bitsandbytes.functional as F

    model = make_tiny_llama(hidden_size=128, intermediate_size=320, vocab_size=500)
    shape = ModelShape.from_config(model.config.to_dict())
    for double_quant in (True, False):
        packed_bytes = const_bytes = 0
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                packed, state = F.quantize_4bit(
                    module.weight.data, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
                )
                packed_bytes += packed.numel()
                tensors = [state.absmax, state.code]
                if double_quant:
                    tensors += [state.state2.absmax, state.state2.code, state.offset]
                const_bytes += sum(t.numel() * t.element_size() for t in tensors)
        est = estimate_memory(
            shape, method="qlora", batch=1, seq=8, compute_dtype="float32", double_quant=double_quant
        )
        other = sum(p.numel() * 4 for n, p in model.named_parameters() if "proj" not in n)
        assert est.components["weights"] == packed_bytes + other
        assert est.components["quant_constants"] == const_bytes


def test_quantization_constants_cost_per_parameter():
    n = 4096 * 11008
    _, with_dq = quantized_bytes(n, 64, True)
    _, without = quantized_bytes(n, 64, False)
    assert with_dq * 8 / n == pytest.approx(8 / 64 + 32 / (64 * 256), rel=3e-3)  # + the code tables
    assert without * 8 / n == pytest.approx(0.5, rel=1e-3)


def _saved_activation_bytes(model, ids) -> int:
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(size for ptr, size in seen.items() if ptr not in params)


@pytest.mark.parametrize("dtype,name", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_activations_track_the_tensors_autograd_saves(dtype, name, method):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama(hidden_size=128, intermediate_size=256, num_layers=3, dtype=dtype)
    shape = ModelShape.from_config(model.config.to_dict())
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
    model.train()
    ids = torch.randint(0, 320, (2, 64))
    measured = _saved_activation_bytes(model, ids)
    est = estimate_memory(
        shape, method=method, batch=2, seq=64, r=8, grad_checkpointing=False, compute_dtype=name
    )
    # the measured pass is the model's own loss: the fp32 log-probabilities log-softmax saves, 4 B a logit
    modelled = est.components["activations"] + 2 * 64 * shape.vocab_size * 4
    assert modelled == pytest.approx(measured, rel=0.15)


def test_gradient_checkpointing_shrinks_activations_not_the_rest():
    shape = ModelShape.from_config(LLAMA2_7B)
    off = estimate_memory(shape, method="qlora", batch=4, seq=1024, grad_checkpointing=False)
    on = estimate_memory(shape, method="qlora", batch=4, seq=1024, grad_checkpointing=True)
    assert on.components["activations"] < off.components["activations"] / 5
    for key in ("weights", "quant_constants", "adapters", "optimizer", "logits"):
        assert on.components[key] == off.components[key]


def test_large_configs_have_their_published_sizes():
    seven = ModelShape.from_config(LLAMA2_7B)
    seventy = ModelShape.from_config(LLAMA3_70B)
    assert seven.num_params() == 6_738_415_616
    assert seventy.num_params() == 70_553_706_496
    full = estimate_memory(seven, method="full", batch=1, seq=512, compute_dtype="float16")
    qlora = estimate_memory(seven, method="qlora", batch=1, seq=512, compute_dtype="float16")
    # 16 bytes per parameter for mixed-precision AdamW fine-tuning; QLoRA's base near 4.1 bits
    assert full.required > 16 * seven.num_params()
    assert qlora.components["weights"] < 0.3 * 2 * seven.num_params()
    assert qlora.required < 10 * 2**30 < full.required
    assert qlora.peak == qlora.required  # quantized while read: no mapped file pages
    big = estimate_memory(seventy, method="qlora", batch=1, seq=512)
    assert 35 * 2**30 < big.components["weights"] + big.components["quant_constants"] < 45 * 2**30


def test_loading_qlora_streams_16bit_methods_map_or_convert():
    seven = ModelShape.from_config(LLAMA2_7B)  # stored in fp16
    n = seven.num_params()
    qlora = estimate_memory(seven, method="qlora", batch=1, seq=512, compute_dtype="bfloat16")
    c = qlora.components
    largest = max(lin.numel for lin in seven.layer_linears())
    # the 4-bit model and the bf16 rest, plus one linear as stored (fp16), converted (bf16) and dequantized
    assert qlora.loading == c["runtime"] + c["weights"] + c["quant_constants"] + largest * (2 + 2 + 4)
    assert qlora.loading_file_pages == 0 and qlora.loading < 6 * 2**30
    # 16-bit LoRA in another dtype than stored: the mapped file and the converted model coexist
    lora = estimate_memory(seven, method="lora", batch=1, seq=512, compute_dtype="bfloat16")
    assert lora.loading == lora.components["runtime"] + n * 2 + n * 2 and lora.loading_file_pages == n * 2
    assert lora.required == max(lora.training, lora.components["runtime"] + n * 2)
    # in the stored dtype: used in place
    in_place = estimate_memory(seven, method="lora", batch=1, seq=512, compute_dtype="float16")
    assert in_place.loading == in_place.components["runtime"] + in_place.components["weights"]


def test_fused_loss_replaces_the_logits_for_known_architectures():
    seven = ModelShape.from_config(LLAMA2_7B)
    tokens, vocab = 4 * 1024, seven.vocab_size
    qlora = estimate_memory(seven, method="qlora", batch=4, seq=1024, compute_dtype="float32")
    full = estimate_memory(seven, method="full", batch=4, seq=1024, compute_dtype="float32")
    assert full.components["logits"] == tokens * vocab * 16
    assert qlora.components["logits"] < tokens * vocab * 16 / 8
    unknown = ModelShape.from_config({**LLAMA2_7B, "model_type": "cohere"})
    assert (
        estimate_memory(unknown, method="qlora", batch=4, seq=1024).components["logits"]
        >= tokens * vocab * 12
    )


def test_allocator_share_only_with_checkpointing():
    from qlorakit.estimate import ALLOCATOR_RETENTION

    shape = ModelShape.from_config({**LLAMA2_7B, "torch_dtype": "bfloat16"})
    off = estimate_memory(shape, method="lora", batch=2, seq=256, grad_checkpointing=False)
    on = estimate_memory(shape, method="lora", batch=2, seq=256, grad_checkpointing=True)
    assert off.components["allocator"] == 0  # every activation is live anyway
    kept = int(ALLOCATOR_RETENTION * off.components["activations"]) - on.components["activations"]
    assert on.components["allocator"] == max(0, kept)
    assert on.peak < off.peak


def _mapped_safetensors_bytes() -> int:
    import psutil

    maps = psutil.Process().memory_maps(grouped=True)
    return sum(m.rss for m in maps if m.path.endswith(".safetensors"))


@pytest.mark.skipif(sys.platform != "linux", reason="reads per-mapping RSS from /proc/self/smaps")
def test_qlora_loading_maps_no_checkpoint_pages(tmp_path):
    from transformers import AutoModelForCausalLM

    from qlorakit.config import QuantConfig
    from qlorakit.quant.loading import load_quantizing

    model = make_tiny_llama(hidden_size=256, intermediate_size=1024, num_layers=4, vocab_size=320)
    model.save_pretrained(tmp_path / "m")
    shape = ModelShape.from_config(tmp_path / "m")
    del model
    before = _mapped_safetensors_bytes()
    loaded = load_quantizing(tmp_path / "m", QuantConfig(), torch.float32)
    assert _mapped_safetensors_bytes() - before < 64 * 1024  # read, not mapped
    assert estimate_memory(shape, method="qlora", batch=1, seq=8).loading_file_pages == 0
    del loaded
    # 16-bit LoRA in the stored dtype: transformers maps the file and uses the tensors in place
    in_place = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    for p in in_place.parameters():
        p.sum()  # touch every page
    resident = _mapped_safetensors_bytes() - before
    est = estimate_memory(shape, method="lora", batch=1, seq=8, compute_dtype="float32")
    assert resident == pytest.approx(shape.num_params() * 4, rel=0.05, abs=256 * 1024)
    assert est.loading == est.components["runtime"] + est.components["weights"]
    del in_place


def test_from_config_accepts_folder_json_yaml_and_builtin(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model:\n  name: m\ntrain:\n  lr: 0.0002\n")
    by_dict = ModelShape.from_config(LLAMA2_7B)
    assert ModelShape.from_config(folder) == by_dict
    assert ModelShape.from_config(folder / "config.json") == by_dict
    assert ModelShape.from_config(yaml_file) == by_dict  # relative to the YAML file
    smol = ModelShape.from_config("smollm2-135m")
    assert (smol.hidden_size, smol.num_layers, smol.num_heads, smol.num_kv_heads) == (576, 30, 9, 3)
    assert (smol.intermediate_size, smol.vocab_size, smol.tie_word_embeddings) == (1536, 49152, True)
    assert smol.checkpoint_format == "gguf"


def test_bad_inputs_raise_config_errors(tmp_path):
    shape = ModelShape.from_config(LLAMA2_7B)
    with pytest.raises(ConfigError, match="method"):
        estimate_memory(shape, method="dora", batch=1, seq=8)
    with pytest.raises(ConfigError, match="dtype"):
        estimate_memory(shape, method="lora", batch=1, seq=8, compute_dtype="int3")
    with pytest.raises(ConfigError, match="match no linear"):
        estimate_memory(shape, method="lora", batch=1, seq=8, targets=["c_attn"])
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelShape.from_config({"model_type": "llama", "vocab_size": 3})
    with pytest.raises(ConfigError, match="model.name"):
        (tmp_path / "c.yaml").write_text("train: {}\n")
        ModelShape.from_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="8GiB"):
        parse_size("lots")


def test_parse_and_format_sizes():
    assert parse_size("8GiB") == 8 * 2**30
    assert parse_size("16GB") == 16 * 10**9
    assert parse_size("512 MiB") == 512 * 2**20
    assert format_bytes(3 * 2**30 // 2) == "1.50 GiB"
    assert format_bytes(512) == "512 B"


def test_advice_is_monotonic_in_the_budget():
    shape = ModelShape.from_config({**LLAMA2_7B, "torch_dtype": "bfloat16"})  # loaded in place
    small = advise(shape, parse_size("10GiB"), seq=512)
    large = advise(shape, parse_size("48GiB"), seq=512)
    by_method = {m.method: m for m in small.methods}
    assert not by_method["full"].fits and not by_method["lora"].fits and by_method["qlora"].fits
    assert small.recommended.method == "qlora"
    assert by_method["qlora"].peak_bytes <= parse_size("10GiB")
    for a, b in zip(small.methods, large.methods, strict=True):
        assert b.max_batch >= a.max_batch and b.max_seq >= a.max_seq
    assert large.recommended.method == "lora"
    assert all(m.max_seq <= 4096 for m in large.methods)  # capped at the model's context
    # what advise reports fitting does fit, and twice the batch does not
    q = by_method["qlora"]
    nxt = estimate_memory(
        shape, method="qlora", batch=2 * q.max_batch, seq=512, grad_checkpointing=q.grad_checkpointing
    )
    assert nxt.required > parse_size("10GiB")


def test_cli_prints_the_table_and_advice(tmp_path, capsys):
    from qlorakit.cli import main

    (tmp_path / "config.json").write_text(json.dumps({**LLAMA2_7B, "torch_dtype": "bfloat16"}))
    assert main(["estimate", str(tmp_path), "--batch", "1", "--seq", "512", "--budget", "10GiB"]) == 0
    out = capsys.readouterr().out
    for text in (
        "full",
        "lora",
        "qlora",
        "Weights",
        "Optimizer states",
        "Peak RSS (estimate)",
        "Must fit in RAM",
        "Allocator-held",
        "-> use qlora",
        "GiB",
    ):
        assert text in out
    assert main(["estimate", str(tmp_path), "--method", "qlora", "--no-grad-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "qlora" in out and "lora " not in out.splitlines()[3]
    assert main(["estimate", str(tmp_path / "missing")]) == 2


def test_a_gguf_is_converted_once_then_streams():
    cfg = {**LLAMA2_7B, "hidden_size": 512, "intermediate_size": 1024, "_checkpoint_format": "gguf"}
    fresh = estimate_memory(ModelShape.from_config(cfg), method="qlora", batch=1, seq=8)
    cached = estimate_memory(
        ModelShape.from_config({**cfg, "_gguf_converted": True}), method="qlora", batch=1, seq=8
    )
    n = ModelShape.from_config(cfg).num_params()
    assert fresh.loading == fresh.components["runtime"] + n * 4  # the fp32 model the first conversion builds
    assert cached.loading < fresh.loading and cached.loading_file_pages == 0
