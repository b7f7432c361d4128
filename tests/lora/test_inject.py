"""inject_lora on real tiny Llamas: PEFT's target rules, freezing, counts, adapters, errors, k-bit prep."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from helpers.tiny import make_tiny_llama
from qlorakit.config import LoRAConfig
from qlorakit.core.errors import ConfigError, ModelError
from qlorakit.lora import (
    LoRALinear,
    ModulesToSaveWrapper,
    count_parameters,
    disable_adapters,
    inject_lora,
    lora_layers,
    prepare_for_kbit_training,
    set_active_adapter,
)


def _peft(model, **kwargs):
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **kwargs))


def _ids(n: int = 10) -> torch.Tensor:
    return torch.randint(0, 320, (2, n), generator=torch.Generator().manual_seed(0))


def _randomise_all(model) -> None:
    with torch.no_grad():
        for i, layer in enumerate(lora_layers(model).values()):
            for name in layer.lora_B:
                g = torch.Generator().manual_seed(i)
                layer.lora_B[name].weight.copy_(
                    torch.randn(layer.lora_B[name].weight.shape, generator=g) * 0.1
                )


CASES = {
    "suffixes": (dict(target_modules=["q_proj", "v_proj"]), dict(target_modules=["q_proj", "v_proj"])),
    "all-linear": (dict(target_modules="all-linear"), dict(target_modules="all-linear")),
    "regex": (dict(target_modules=r".*\.(up|gate)_proj"), dict(target_modules=r".*\.(up|gate)_proj")),
    "exclude+layers": (
        dict(target_modules="all-linear", exclude_modules=["o_proj"], layers_to_transform=[1]),
        # PEFT refuses layers_to_transform with the "all-linear" string; the same selection spelled out:
        dict(
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            exclude_modules=["o_proj"],
            layers_to_transform=[1],
        ),
    ),
    "patterns": (
        dict(
            target_modules=["q_proj", "down_proj"],
            rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
            alpha_pattern={"down_proj": 3.0},
        ),
        dict(
            target_modules=["q_proj", "down_proj"],
            rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
            alpha_pattern={"down_proj": 3.0},
        ),
    ),
    "modules_to_save+bias": (
        dict(target_modules=["k_proj"], modules_to_save=["lm_head"], bias="all"),
        dict(target_modules=["k_proj"], modules_to_save=["lm_head"], bias="all"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_targets_ranks_and_counts_match_peft(case):
    ours_kw, peft_kw = CASES[case]
    ours = make_tiny_llama()
    report = inject_lora(ours, LoRAConfig(r=4, alpha=8, dropout=0.0, **ours_kw), seed=0)
    peft_model = _peft(
        make_tiny_llama(),
        r=4,
        lora_alpha=8,
        **{k: v for k, v in peft_kw.items() if k != "bias"},
        bias=peft_kw.get("bias", "none"),
    )
    assert sorted(report.targets) == sorted(peft_model.targeted_module_names)
    peft_layers = {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    for path, layer in lora_layers(ours).items():
        assert layer.r["default"] == peft_layers[path].r["default"], path
        assert layer.scaling["default"] == pytest.approx(peft_layers[path].scaling["default"]), path
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert (report.trainable, report.total) == (trainable, total)
    assert (
        str(report)
        == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


def test_adapter_starts_as_noop_and_freezes_the_rest():
    model = make_tiny_llama()
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, use_dora=True), seed=0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(("lora_A" in n or "lora_B" in n or "lora_magnitude_vector" in n) for n in names)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_gradients_reach_only_trainable_params(bias):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=True, mlp_bias=True)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    inject_lora(
        model,
        LoRAConfig(
            r=2, alpha=4, target_modules=["q_proj", "up_proj"], modules_to_save=["lm_head"], bias=bias
        ),
    )
    _randomise_all(model)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in got if ".lora_" in n}
    assert len(lora) == 2 * 2 * 2  # A and B of q_proj and up_proj in 2 layers
    assert {n for n in got if "lm_head" in n} == {"lm_head.modules_to_save.default.weight"}
    biases = {n for n in got if n.endswith(".bias")}
    if bias == "none":
        assert not biases
    elif bias == "all":
        assert biases == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    else:
        assert biases == {
            n for n in biases if n.endswith(("q_proj.base_layer.bias", "up_proj.base_layer.bias"))
        }
        assert len(biases) == 4


def test_modules_to_save_keeps_original_and_paths():
    model = make_tiny_llama()
    report = inject_lora(
        model, LoRAConfig(r=2, alpha=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    assert report.modules_to_save == ["lm_head"]
    wrapper = model.lm_head
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert wrapper.weight is wrapper.modules_to_save["default"].weight
    ids = _ids()
    with torch.no_grad():
        base_logits = model(ids).logits
        wrapper.modules_to_save["default"].weight.add_(0.5)
        assert not torch.allclose(model(ids).logits, base_logits)
        with disable_adapters(model):
            torch.testing.assert_close(model(ids).logits, base_logits)


def test_second_adapter_switching_and_disable():
    model = make_tiny_llama()
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=1)
    _randomise_all(model)
    report = inject_lora(
        model, LoRAConfig(r=2, alpha=8, target_modules=["v_proj", "down_proj"]), adapter_name="b", seed=2
    )
    assert len(report.targets) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable), "only the new adapter trains"
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if "b" in layer.lora_B:
                layer.lora_B["b"].weight.normal_(std=0.1)
        out_b = model(ids).logits
        set_active_adapter(model, "default")
        out_default = model(ids).logits
        assert not torch.allclose(out_b, out_default)
        q = model.model.layers[0].self_attn.q_proj
        assert q.active_adapter == "default"
        with disable_adapters(model):
            assert torch.equal(model(ids).logits, base)
        torch.testing.assert_close(model(ids).logits, out_default)
    with pytest.raises(ConfigError, match="no adapter named 'c'"):
        set_active_adapter(model, "c")
    with pytest.raises(ConfigError, match="already in the model"):
        inject_lora(model, LoRAConfig(target_modules=["q_proj"]), adapter_name="b")


def test_seeded_injection_is_reproducible():
    weights = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        model = make_tiny_llama()
        inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=42)
        weights.append([m.lora_A["default"].weight.clone() for m in lora_layers(model).values()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
    assert not torch.equal(weights[0][0], weights[0][1]), "each layer draws its own A"


def test_errors_name_the_problem():
    with pytest.raises(
        ModelError,
        match=r"\['qproj'\] matched no module.*q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head",
    ):
        inject_lora(make_tiny_llama(), LoRAConfig(target_modules=["qproj", "v_proj"]))
    with pytest.raises(ModelError, match="selected no module"):
        inject_lora(make_tiny_llama(), LoRAConfig(target_modules=r"nothing\..*"))
    with pytest.raises(ModelError, match=r"'model.layers.0.mlp' is a .*LlamaMLP"):
        inject_lora(make_tiny_llama(), LoRAConfig(target_modules=["mlp"]))
    with pytest.raises(ConfigError, match="lora.r"):
        inject_lora(make_tiny_llama(), LoRAConfig(r=0))
    with pytest.raises(ConfigError, match="rank_pattern.q_proj"):
        inject_lora(make_tiny_llama(), LoRAConfig(rank_pattern={"q_proj": -1}))
    with pytest.raises(ConfigError, match="layers_to_transform"):
        inject_lora(make_tiny_llama(), LoRAConfig(target_modules=".*q_proj", layers_to_transform=[0]))
    with pytest.raises(ModelError, match="modules_to_save entry 'score'"):
        inject_lora(make_tiny_llama(), LoRAConfig(target_modules=["q_proj"], modules_to_save=["score"]))


def test_all_linear_skips_tied_output_head():
    model = make_tiny_llama(tie_word_embeddings=True)
    report = inject_lora(model, LoRAConfig(target_modules="all-linear"))
    assert not any("lm_head" in t for t in report.targets)
    assert len(report.targets) == 2 * 7


def test_count_parameters_counts_4bit_weights():
    from qlorakit.quant.linear import Linear4bit

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    trainable, total = count_parameters(model)
    assert (trainable, total) == (64 * 32 + 32 + 32 * 8 + 8, 64 * 32 + 32 + 32 * 8 + 8)
    model[0] = Linear4bit.from_linear(model[0], compute_dtype=torch.float32)
    assert count_parameters(model)[1] == total
    model.requires_grad_(False)
    assert count_parameters(model)[0] == 0


class _HalfNorm(nn.Module):
    """A norm that (unlike Hugging Face's) computes its statistics in the input's precision."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_prepare_for_kbit_training():
    model = make_tiny_llama(dtype=torch.bfloat16)
    model.model.norm = _HalfNorm(64).to(torch.bfloat16)
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    assert model.config.use_cache is False
    assert model.is_activation_checkpointing
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16, "no blanket fp32 upcast of embeddings"
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16  # computes in fp32 already
    assert model.model.norm.weight.dtype == torch.float32  # the half-precision norm now runs in fp32
    assert not any(p.requires_grad for p in model.parameters())
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "down_proj"]), seed=0)
    _randomise_all(model)
    model.train()
    ids = _ids()
    torch.manual_seed(0)  # dropout masks: the recomputation in backward must redraw the same ones
    loss = model(ids, labels=ids).loss
    assert loss.dtype in (torch.bfloat16, torch.float32) and torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 8 and all(g.abs().sum() > 0 for g in grads.values())
    model.activation_checkpointing_disable()
    model.zero_grad()
    torch.manual_seed(0)
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)
    with pytest.raises(ModelError, match="PreTrainedModel"):
        prepare_for_kbit_training(nn.Linear(2, 2), gradient_checkpointing=False)


def test_lora_layers_paths():
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(target_modules=["o_proj"]))
    layers = lora_layers(model)
    assert list(layers) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert all(isinstance(m, LoRALinear) for m in layers.values())
