"""The PEFT adapter folder: exact files, keys and config bytes as PEFT writes them; every failure named."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open

from helpers.tiny import make_tiny_llama
from qlorakit.config import LoRAConfig
from qlorakit.core.errors import CheckpointError, ConfigError, FormatError, ModelError
from qlorakit.lora import inject_lora, load_adapter, lora_layers, read_adapter_config, save_adapter
from qlorakit.lora.peft_format import CONFIG_NAME, WEIGHTS_NAME

NAME = "tiny/llama"


def _trained(cfg: LoRAConfig, **model_kwargs):
    model = make_tiny_llama(**model_kwargs)
    model.config._name_or_path = NAME
    inject_lora(model, cfg, seed=0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(std=0.1)
    return model


def _tensor_summary(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118


def test_files_match_what_peft_writes_byte_for_byte(tmp_path):
    """Same config JSON bytes, same tensor names/shapes/dtypes and metadata as PEFT's save_pretrained."""
    settings = dict(
        target_modules=r".*\.(q|v|down)_proj", rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}
    )
    ours = _trained(
        LoRAConfig(r=4, alpha=8, dropout=0.1, use_dora=True, modules_to_save=["lm_head"], **settings)
    )
    save_adapter(
        ours,
        tmp_path / "ours",
        LoRAConfig(r=4, alpha=8, dropout=0.1, use_dora=True, modules_to_save=["lm_head"], **settings),
        base_model_name_or_path=NAME,
    )

    base = make_tiny_llama()
    base.config._name_or_path = NAME
    peft_cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        use_dora=True,
        modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
        base_model_name_or_path=NAME,
        **settings,
    )
    peft_model = get_peft_model(base, peft_cfg)
    peft_model.peft_config["default"].base_model_name_or_path = NAME  # PEFT reads it from model.__dict__
    peft_model.save_pretrained(tmp_path / "peft")

    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert (tmp_path / "ours" / CONFIG_NAME).read_bytes() == (tmp_path / "peft" / CONFIG_NAME).read_bytes()
    assert _tensor_summary(tmp_path / "ours" / WEIGHTS_NAME) == _tensor_summary(
        tmp_path / "peft" / WEIGHTS_NAME
    )


def test_config_fields_are_peft_fields(tmp_path):
    model = _trained(LoRAConfig(target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a", LoRAConfig(target_modules=["q_proj"]), base_model_name_or_path=NAME)
    written = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert set(written) == set(LoraConfig().to_dict())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert written["r"] == 16 and written["lora_alpha"] == 32 and written["target_modules"] == ["q_proj"]
    assert written["init_lora_weights"] is True and written["inference_mode"] is True


def test_all_linear_is_written_as_the_module_list(tmp_path):
    cfg = LoRAConfig(r=2, alpha=4, target_modules="all-linear", layers_to_transform=[0])
    model = _trained(cfg)
    save_adapter(model, tmp_path / "a", cfg, base_model_name_or_path=NAME)
    read = read_adapter_config(tmp_path / "a")
    assert read.target_modules == sorted(lora_layers(model))
    assert len(read.target_modules) == 7 and read.layers_to_transform == [0]


@pytest.mark.parametrize(
    "cfg",
    [
        LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        LoRAConfig(
            r=8, alpha=16.5, use_rslora=True, use_dora=True, init="gaussian", target_modules=r".*o_proj"
        ),
        LoRAConfig(
            r=4,
            alpha=8,
            rank_pattern={"q_proj": 2},
            alpha_pattern={"k_proj": 4.0},
            modules_to_save=["lm_head"],
            target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
            exclude_modules=["up_proj"],
            bias="lora_only",
            dropout=0.0,
        ),
    ],
)
def test_round_trip(tmp_path, cfg):
    model = _trained(cfg)
    model.eval()
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model, tmp_path / "a", cfg, base_model_name_or_path=NAME)
    assert read_adapter_config(tmp_path / "a") == cfg
    fresh = make_tiny_llama()
    loaded = load_adapter(fresh, tmp_path / "a")
    assert loaded == cfg
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
    assert not any(p.requires_grad for p in fresh.parameters()), "loaded for inference: frozen"


def test_is_trainable_and_second_adapter(tmp_path):
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj"])
    save_adapter(_trained(cfg), tmp_path / "a", cfg, base_model_name_or_path=NAME)
    model = make_tiny_llama()
    load_adapter(model, tmp_path / "a", is_trainable=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"
    }
    load_adapter(model, tmp_path / "a", adapter_name="second")
    assert model.model.layers[0].self_attn.q_proj.active_adapter == "second"
    with pytest.raises(ConfigError, match="already in the model"):
        load_adapter(model, tmp_path / "a", adapter_name="second")


def test_save_into_existing_folder_keeps_other_files(tmp_path):
    cfg = LoRAConfig(target_modules=["q_proj"])
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "trainer_state.json").write_text("{}")
    save_adapter(_trained(cfg), out, cfg, base_model_name_or_path=NAME)
    save_adapter(_trained(cfg), out, cfg, base_model_name_or_path=NAME)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "trainer_state.json"]


def test_save_without_adapter_or_with_wrong_config_fails(tmp_path):
    with pytest.raises(ModelError, match="inject_lora"):
        save_adapter(make_tiny_llama(), tmp_path / "a", LoRAConfig(), base_model_name_or_path=NAME)
    model = _trained(LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="r=4, scaling=2, dora=False but the config gives r=8"):
        save_adapter(
            model,
            tmp_path / "a",
            LoRAConfig(r=8, alpha=8, target_modules=["q_proj"]),
            base_model_name_or_path=NAME,
        )
    assert not (tmp_path / "a").exists()


@pytest.fixture
def saved(tmp_path):
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"])
    save_adapter(_trained(cfg), tmp_path / "a", cfg, base_model_name_or_path=NAME)
    return tmp_path / "a"


def _edit_config(folder, **changes):
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_and_corrupt_files(saved):
    (saved / WEIGHTS_NAME).write_bytes((saved / WEIGHTS_NAME).read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME}.*corrupt"):
        load_adapter(make_tiny_llama(), saved)
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME}: adapter weights not found"):
        load_adapter(make_tiny_llama(), saved)
    (saved / CONFIG_NAME).write_text("{not json")
    with pytest.raises(FormatError, match=rf"{CONFIG_NAME}: not valid JSON"):
        read_adapter_config(saved)
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError, match=rf"{CONFIG_NAME}: adapter config not found"):
        read_adapter_config(saved)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out=True"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' changes the base weights"),
        ({"r": 0}, "lora.r: must be a positive integer"),
        ({"bias": "some"}, "lora.bias"),
    ],
)
def test_config_problems_name_the_file(saved, changes, message):
    _edit_config(saved, **changes)
    with pytest.raises(FormatError, match=message) as info:
        read_adapter_config(saved)
    assert CONFIG_NAME in str(info.value)


def test_shape_mismatch_names_key_and_shapes(saved):
    model = make_tiny_llama(intermediate_size=96)
    with pytest.raises(
        FormatError, match=r"up_proj.lora_B.weight' has shape \[128, 4\] but this model needs \[96, 4\]"
    ):
        load_adapter(model, saved)
    assert not lora_layers(model), "a failed load leaves the model untouched"
    _edit_config(saved, r=8)
    with pytest.raises(
        FormatError, match=r"lora_A.weight' has shape \[4, 64\] but this model needs \[8, 64\]"
    ):
        load_adapter(make_tiny_llama(), saved)


def test_missing_or_extra_tensors(saved):
    _edit_config(saved, target_modules=["q_proj", "up_proj", "k_proj"])
    with pytest.raises(FormatError, match="missing 4 tensor"):
        load_adapter(make_tiny_llama(), saved)
    _edit_config(saved, target_modules=["q_proj"])
    with pytest.raises(FormatError, match="4 tensor.*no place for"):
        load_adapter(make_tiny_llama(), saved)
    _edit_config(saved, target_modules=["nope"])
    with pytest.raises(FormatError, match="does not fit this model.*matched no module"):
        load_adapter(make_tiny_llama(), saved)


def test_other_base_name_only_warns(saved):
    model = make_tiny_llama()
    model.config._name_or_path = "someone/else"
    with pytest.warns(UserWarning, match="trained on 'tiny/llama'"):
        load_adapter(model, saved)
    assert len(lora_layers(model)) == 4


def test_pickle_weights_are_not_loaded(saved):
    (saved / WEIGHTS_NAME).rename(saved / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_adapter(make_tiny_llama(), saved)
