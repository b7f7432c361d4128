"""Acceptance: adapters move between qlorakit and the real PEFT with the same logits, on plain and 4-bit bases.

The 4-bit reference is transformers + bitsandbytes (`BitsAndBytesConfig`, NF4 + double quant, which runs on
this CPU) with PEFT on top; qlorakit's own 4-bit layers are bit-identical to it in storage, so only the matmul
rounding differs. Every comparison pins fp32 on both sides (the tiny models are built in fp32 and the 4-bit
layers compute in fp32), and bitsandbytes is run through its training path (`bnb_reference_logits`), whose
numerics do not depend on which CPU kernel it would pick for inference.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from helpers.tiny import bnb_reference_logits, make_tiny_llama
from qlorakit.config import LoRAConfig
from qlorakit.lora import (
    ModulesToSaveWrapper,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_layers,
    save_adapter,
)

pytestmark = pytest.mark.dtype_sensitive

FP32_TOL = 1e-5  # plain base, fp32: the same maths in a different order
Q4_TOL = 1e-4  # 4-bit base, fp32 compute: identical dequantized weights, different matmul kernels

# (qlorakit LoRAConfig kwargs, peft LoraConfig kwargs): the same adapter spelled both ways.
VARIANTS = {
    "plain": (dict(target_modules=["q_proj", "v_proj"]), dict(target_modules=["q_proj", "v_proj"])),
    "rslora": (
        dict(target_modules=["k_proj", "o_proj"], use_rslora=True),
        dict(target_modules=["k_proj", "o_proj"], use_rslora=True),
    ),
    "dora": (
        dict(target_modules=["q_proj", "up_proj", "down_proj"], use_dora=True),
        dict(target_modules=["q_proj", "up_proj", "down_proj"], use_dora=True),
    ),
    "rank_pattern": (
        dict(
            target_modules=["q_proj", "gate_proj"],
            rank_pattern={r"layers\.0\.self_attn\.q_proj": 2},
            alpha_pattern={"gate_proj": 3.0},
        ),
        dict(
            target_modules=["q_proj", "gate_proj"],
            rank_pattern={r"layers\.0\.self_attn\.q_proj": 2},
            alpha_pattern={"gate_proj": 3},
        ),
    ),
    "modules_to_save": (
        dict(target_modules=["v_proj"], modules_to_save=["lm_head"]),
        dict(target_modules=["v_proj"], modules_to_save=["lm_head"]),
    ),
    "regex": (
        dict(target_modules=r"model\.layers\.1\..*_proj"),
        dict(target_modules=r"model\.layers\.1\..*_proj"),
    ),
}


def _ids() -> torch.Tensor:
    return torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(0))


def _randomise_ours(model: nn.Module) -> None:
    """Simulate training: non-zero B, perturbed A / magnitudes / modules_to_save copies."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if "default" in layer.lora_magnitude_vector:
                layer.lora_magnitude_vector["default"].weight.mul_(
                    1 + 0.2 * torch.rand(layer.out_features, generator=g)
                )
        for m in model.modules():
            if isinstance(m, ModulesToSaveWrapper):
                m.modules_to_save["default"].weight.add_(torch.randn(m.weight.shape, generator=g) * 0.05)


def _randomise_peft(peft_model: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                scale = 0.05 if "modules_to_save" in name else 0.1
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
                else:
                    p.add_(torch.randn(p.shape, generator=g) * scale)


def _logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(_ids()).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qlorakit_adapter_loads_in_peft(tmp_path, variant):
    ours_kw, _ = VARIANTS[variant]
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.05, **ours_kw)
    model = make_tiny_llama()
    inject_lora(model, cfg, seed=0)
    _randomise_ours(model)
    expected = _logits(model)
    save_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path="tiny-llama")
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter")
    got = _logits(peft_model)
    assert (got - expected).abs().max().item() <= FP32_TOL
    assert (got - _logits(make_tiny_llama())).abs().max().item() > 1e-3, "the adapter must change the logits"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_loads_in_qlorakit(tmp_path, variant):
    _, peft_kw = VARIANTS[variant]
    peft_model = get_peft_model(
        make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, task_type="CAUSAL_LM", **peft_kw)
    )
    _randomise_peft(peft_model)
    expected = _logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = make_tiny_llama()
    load_adapter(model, tmp_path / "adapter")
    got = _logits(model)
    assert (got - expected).abs().max().item() <= FP32_TOL
    assert (got - _logits(make_tiny_llama())).abs().max().item() > 1e-3


def test_all_linear_with_layers_to_transform_loads_in_peft(tmp_path):
    cfg = LoRAConfig(
        r=4, alpha=8, target_modules="all-linear", layers_to_transform=[1], exclude_modules=["o_proj"]
    )
    model = make_tiny_llama()
    report = inject_lora(model, cfg, seed=0)
    _randomise_ours(model)
    save_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path="tiny-llama")
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter")
    assert sorted(peft_model.targeted_module_names) == sorted(report.targets)
    assert (_logits(peft_model) - _logits(model)).abs().max().item() <= FP32_TOL


# ---------------------------------------------------------------------------------------------------------
# 4-bit bases


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "llama"
    make_tiny_llama().save_pretrained(out)
    return out


def _bnb_model(folder):
    """The same tiny Llama loaded by transformers + bitsandbytes as NF4 + double quant (fp32 compute)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, device_map="cpu", dtype=torch.float32
    )


def _qlorakit_4bit_model() -> nn.Module:
    """The tiny Llama with every linear layer but the head replaced by qlorakit's Linear4bit (NF4 + double quant)."""
    from qlorakit.quant.linear import Linear4bit

    model = make_tiny_llama()
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and path != "lm_head":
            parent, _, child = path.rpartition(".")
            setattr(
                model.get_submodule(parent),
                child,
                Linear4bit.from_linear(module, compute_dtype=torch.float32),
            )
    return model


@pytest.mark.parametrize("use_dora", [False, True])
def test_4bit_qlorakit_adapter_matches_peft_on_bitsandbytes(tmp_path, tiny_dir, use_dora):
    cfg = LoRAConfig(r=8, alpha=16, target_modules="all-linear", use_dora=use_dora)
    model = _qlorakit_4bit_model()
    inject_lora(model, cfg, seed=0)
    _randomise_ours(model)
    expected = _logits(model)
    save_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path=str(tiny_dir))
    peft_model = PeftModel.from_pretrained(_bnb_model(tiny_dir), tmp_path / "adapter")
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    got = bnb_reference_logits(peft_model, _ids())
    assert (got - expected).abs().max().item() <= Q4_TOL


@pytest.mark.parametrize("use_dora", [False, True])
def test_4bit_peft_adapter_on_bitsandbytes_loads_in_qlorakit(tmp_path, tiny_dir, use_dora):
    peft_cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=use_dora, use_rslora=True,
                          modules_to_save=["lm_head"], task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(_bnb_model(tiny_dir), peft_cfg)
    _randomise_peft(peft_model)
    expected = bnb_reference_logits(peft_model, _ids())
    peft_model.save_pretrained(tmp_path / "adapter")
    model = _qlorakit_4bit_model()
    load_adapter(model, tmp_path / "adapter")
    assert len(lora_layers(model)) == 14
    assert count_parameters(model)[1] == peft_model.get_nb_trainable_parameters()[1], (
        "4-bit weights: 2 per byte"
    )
    got = _logits(model)
    assert (got - expected).abs().max().item() <= Q4_TOL


def _biased_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=True, mlp_bias=True)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_travel_both_ways(tmp_path, bias):
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"], bias=bias)
    model = _biased_llama()
    inject_lora(model, cfg, seed=0)
    _randomise_ours(model)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")):
            p.add_(0.1)
    save_adapter(model, tmp_path / "ours", cfg, base_model_name_or_path="biased")
    peft_model = PeftModel.from_pretrained(_biased_llama(), tmp_path / "ours")
    assert (_logits(peft_model) - _logits(model)).abs().max().item() <= FP32_TOL

    peft_model = get_peft_model(
        _biased_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], bias=bias)
    )
    _randomise_peft(peft_model)  # biases are trainable under both settings, so they change too
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = _biased_llama()
    load_adapter(loaded, tmp_path / "peft")
    assert (_logits(loaded) - _logits(peft_model)).abs().max().item() <= FP32_TOL
    assert (_logits(loaded) - _logits(_biased_llama())).abs().max().item() > 1e-3
