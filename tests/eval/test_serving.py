"""The multi-adapter server on a real tiny Llama with real adapters: each adapter (and none) answers as a
model loaded with that adapter alone; the 4-bit base is rebuilt with the quant settings saved by training."""

from __future__ import annotations

import pytest
import torch

from qlorakit.config import QuantConfig
from qlorakit.core.errors import ConfigError, ModelError
from qlorakit.eval.generation import GenerationSettings, generate_text, render_prompt
from qlorakit.eval.serving import AdapterServer
from qlorakit.models.load import adapter_quant_config, load_base

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest
FP32 = QuantConfig(compute_dtype="float32")
PROMPT = "What is 2 + 3?"


@pytest.mark.parametrize("four_bit", [True, False])
def test_server_matches_single_adapter_models(tiny_adapters, four_bit):
    settings = GenerationSettings(max_new_tokens=16)
    server = AdapterServer(
        tiny_adapters / "base",
        {"alpha": tiny_adapters / "alpha", "beta": tiny_adapters / "beta"},
        four_bit=four_bit,
        quant=FP32,
    )
    ids = torch.tensor([render_prompt(PROMPT, server.tokenizer)])
    outputs = {}
    for name in ("alpha", "beta", None, "alpha"):  # switch back and forth: nothing sticks
        with server.using(name) as model, torch.no_grad():
            logits = model(input_ids=ids).logits
        single, tokenizer = load_base(tiny_adapters / "base", four_bit=four_bit, quant=FP32)
        if name is not None:
            from qlorakit.lora import load_adapter

            load_adapter(single, tiny_adapters / name)
        with torch.no_grad():
            torch.testing.assert_close(logits, single(input_ids=ids).logits, rtol=0, atol=1e-6)
        text = server.generate(PROMPT, name, settings)
        assert text == generate_text(single, tokenizer, PROMPT, settings)
        outputs[name] = text
    assert len({outputs["alpha"], outputs["beta"], outputs[None]}) == 3  # the adapters matter
    with pytest.raises(ModelError, match="no adapter named 'gamma'"):
        server.generate(PROMPT, "gamma", settings)
    with pytest.raises(ConfigError, match="already loaded"):
        server.add_adapter("alpha", tiny_adapters / "beta")


def test_server_on_a_loaded_model_needs_a_tokenizer(tiny_llama, tiny_tokenizer):
    with pytest.raises(ConfigError, match="tokenizer"):
        AdapterServer(tiny_llama)
    server = AdapterServer(tiny_llama, tokenizer=tiny_tokenizer)
    assert server.adapter_names == []
    assert server.generate(PROMPT, settings=GenerationSettings(max_new_tokens=8)) == generate_text(
        tiny_llama, tiny_tokenizer, PROMPT, GenerationSettings(max_new_tokens=8)
    )


def test_base_is_built_with_the_quant_settings_saved_by_training(tiny_adapters, tmp_path):
    """`qlorakit train` saves config.yaml beside the adapter; the 4-bit base is rebuilt the same way."""
    import shutil

    from qlorakit.quant.linear import Linear4bit

    adapter = tmp_path / "alpha128"
    shutil.copytree(tiny_adapters / "alpha", adapter)
    assert adapter_quant_config(adapter) is None
    (adapter / "config.yaml").write_text(
        "quant:\n  blocksize: 128\n  double_quant: false\n  compute_dtype: float32\n"
    )
    quant = adapter_quant_config(adapter)
    assert (quant.blocksize, quant.double_quant, quant.compute_dtype) == (128, False, "float32")
    server = AdapterServer(tiny_adapters / "base", {"a": adapter})
    layers = [m for m in server.model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.quant_state.blocksize == 128 and m.quant_state.nested is None for m in layers)
    with pytest.warns(UserWarning, match=r"\['a'\] were trained against a 4-bit base built with other"):
        mixed = AdapterServer(
            tiny_adapters / "base", {"plain": tiny_adapters / "alpha", "a": adapter}, quant=None
        )
    assert all(m.quant_state.blocksize == 64 for m in mixed.model.modules() if isinstance(m, Linear4bit))
    (adapter / "config.yaml").write_text("quant:\n  blocksize: 100\n")
    with pytest.raises(ConfigError, match="blocksize"):
        adapter_quant_config(adapter)
