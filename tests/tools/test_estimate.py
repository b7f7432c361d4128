"""The memory model against real parameter, gradient, optimizer and quantized-tensor bytes of tiny models."""

from __future__ import annotations

import sys

import pytest
import torch

from helpers.configs import LLAMA2_7B, LLAMA3_70B
from helpers.tiny import make_tiny_llama
from qlorakit.config import Config
from qlorakit.core.errors import ConfigError
from qlorakit.core.memory import block_cache_bytes, requested_mode
from qlorakit.models.shape import ModelShape
from qlorakit.tools.estimate.advice import RunSettings
from qlorakit.tools.estimate.memory import estimate_memory, quantized_bytes

pytestmark = pytest.mark.dtype_sensitive


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
    from qlorakit.config import LoRAConfig
    from qlorakit.lora.inject import inject_lora, prepare_for_kbit_training

    model = make_tiny_llama(hidden_size=128, intermediate_size=256, num_layers=3, dtype=dtype)
    shape = ModelShape.from_config(model.config.to_dict())
    if method == "lora":  # qlorakit's own LoRA layer, as training injects it
        prepare_for_kbit_training(model, gradient_checkpointing=False)
        inject_lora(model, LoRAConfig(r=8, dropout=0.0), seed=0)
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
    for key in ("weights", "quant_constants", "adapters", "optimizer"):
        assert on.components[key] == off.components[key]
    # the loss's backward is over before the first layer is recomputed: only its excess over a layer counts
    assert on.components["logits"] <= off.components["logits"]


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
    kw = dict(batch=4, seq=1024, compute_dtype="float32", grad_checkpointing=False)
    qlora = estimate_memory(seven, method="qlora", **kw)
    full = estimate_memory(seven, method="full", **kw)
    assert full.components["logits"] == tokens * vocab * 16
    assert qlora.components["logits"] < tokens * vocab * 16 / 8
    unknown = ModelShape.from_config({**LLAMA2_7B, "model_type": "cohere"})
    assert (
        estimate_memory(unknown, method="qlora", batch=4, seq=1024, grad_checkpointing=False).components[
            "logits"
        ]
        >= tokens * vocab * 12
    )


def test_allocator_modes_keep_what_each_allocator_keeps():
    shape = ModelShape.from_config({**LLAMA2_7B, "torch_dtype": "bfloat16"})

    def held(mode: str, gc: bool, seq: int = 256) -> int:
        est = estimate_memory(shape, method="lora", batch=2, seq=seq, grad_checkpointing=gc, allocator=mode)
        return est.components["allocator"]

    # without checkpointing one batch shape frees nothing before the peak: every activation is live
    assert held("mmap", False) == held("off", False) == 0
    # with it, the recomputed layers' tensors are freed: [512, 4096] activations are 1 MiB and more, so
    # "mmap" returns almost all of them, glibc's heap ("off") keeps a share, the block cache its bound
    assert held("mmap", True) < held("off", True) / 10
    assert held("mmap", True) < held("cache", True) <= held("mmap", True) + block_cache_bytes()
    # short rows put every activation under 1 MiB, in glibc's heap whatever the mode
    assert held("mmap", True, seq=16) == held("off", True, seq=16) > 0
    with pytest.raises(ConfigError, match="allocator mode"):
        held("jemalloc", True)


def test_the_allocator_mode_is_the_one_the_command_line_applies(monkeypatch):
    shape = ModelShape.from_config({**LLAMA2_7B, "torch_dtype": "bfloat16"})
    for value, mode in (("0", "off"), ("mmap", "mmap"), ("cache", "cache")):
        monkeypatch.setenv("QLORAKIT_MALLOC_TUNING", value)
        assert RunSettings.from_config(Config()).allocator == requested_mode() == mode
        implicit = estimate_memory(shape, method="qlora", batch=1, seq=64)
        explicit = estimate_memory(shape, method="qlora", batch=1, seq=64, allocator=mode)
        assert implicit.components == explicit.components


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
    loaded = load_quantizing(tmp_path / "m", QuantConfig().to_settings(torch.float32))
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
