"""Generation helpers and the multi-adapter server, on a real tiny Llama with real adapters."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny import make_adapter, make_tiny_llama, make_tiny_tokenizer
from qlorakit.config import QuantConfig
from qlorakit.errors import ConfigError, ModelError
from qlorakit.eval.generation import (
    AdapterServer,
    GenerationSettings,
    generate_ids,
    generate_text,
    load_base,
    parse_adapter_specs,
    render_prompt,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest
FP32 = QuantConfig(compute_dtype="float32")
PROMPT = "What is 2 + 3?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    make_adapter(root / "base", root / "alpha", seed=1)
    make_adapter(root / "base", root / "beta", seed=2)
    return root


def manual_greedy(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Reference decoding: full forward each step, argmax of the last position, stop at EOS."""
    out: list[int] = []
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
            if nxt == eos:
                break
    return out


def test_greedy_matches_manual_argmax_loop(tiny_llama, tiny_tokenizer):
    ids = render_prompt(PROMPT, tiny_tokenizer)
    got = generate_ids(tiny_llama, tiny_tokenizer, ids, GenerationSettings(max_new_tokens=12))
    assert got == manual_greedy(tiny_llama, ids, 12, tiny_tokenizer.eos_token_id)


def test_stops_at_eos(tiny_llama, tiny_tokenizer):
    """Bias the head towards EOS after a few tokens: generation ends with EOS, before max_new_tokens."""
    ids = render_prompt(PROMPT, tiny_tokenizer)
    with torch.no_grad():
        tiny_llama.lm_head.weight[tiny_tokenizer.eos_token_id] *= 0
        tiny_llama.lm_head.bias = None
        tiny_llama.lm_head.weight[tiny_tokenizer.eos_token_id] += tiny_llama.model.norm.weight * 5
    got = generate_ids(tiny_llama, tiny_tokenizer, ids, GenerationSettings(max_new_tokens=50))
    assert got[-1] == tiny_tokenizer.eos_token_id and len(got) < 50
    assert got == manual_greedy(tiny_llama, ids, 50, tiny_tokenizer.eos_token_id)


def test_sampling_is_seeded_and_leaves_global_rng(tiny_llama, tiny_tokenizer):
    ids = render_prompt(PROMPT, tiny_tokenizer)
    s1 = GenerationSettings(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=7)
    s2 = GenerationSettings(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=8)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = generate_ids(tiny_llama, tiny_tokenizer, ids, s1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert generate_ids(tiny_llama, tiny_tokenizer, ids, s1) == a
    assert generate_ids(tiny_llama, tiny_tokenizer, ids, s2) != a
    assert a != generate_ids(tiny_llama, tiny_tokenizer, ids, GenerationSettings(max_new_tokens=16))


def test_streaming_pieces_add_up_to_the_completion(tiny_llama, tiny_tokenizer):
    pieces: list[str] = []
    text = generate_text(
        tiny_llama, tiny_tokenizer, PROMPT, GenerationSettings(max_new_tokens=20), on_text=pieces.append
    )
    assert len(pieces) > 1 and "".join(pieces) == text


def test_prompt_rendering_is_the_training_one(tiny_tokenizer):
    from qlorakit.data import Message, prompt_ids

    ids = render_prompt(PROMPT, tiny_tokenizer)
    assert ids == prompt_ids(PROMPT, tiny_tokenizer, "auto")
    text = tiny_tokenizer.decode(ids)
    assert "<|im_start|>user\nWhat is 2 + 3?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    chat = [Message("user", "hi"), Message("assistant", "hello"), Message("user", PROMPT)]
    assert render_prompt(chat, tiny_tokenizer) == prompt_ids(tuple(chat), tiny_tokenizer, "auto")
    alpaca = tiny_tokenizer.decode(render_prompt(PROMPT, tiny_tokenizer, "alpaca"))
    assert alpaca.rstrip().endswith("### Response:")
    with pytest.raises(ConfigError, match="empty"):
        render_prompt("  ", tiny_tokenizer)


def test_settings_validation():
    with pytest.raises(ConfigError, match="temperature"):
        GenerationSettings(temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        GenerationSettings(top_p=0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)


def test_parse_adapter_specs(setup):
    specs = parse_adapter_specs([str(setup / "alpha"), f"b={setup / 'beta'}"])
    assert specs == {"alpha": setup / "alpha", "b": setup / "beta"}
    with pytest.raises(ConfigError, match="given twice"):
        parse_adapter_specs([str(setup / "alpha"), f"alpha={setup / 'beta'}"])
    with pytest.raises(ConfigError, match="adapter_config.json"):
        parse_adapter_specs([str(setup / "missing")])


@pytest.mark.parametrize("four_bit", [True, False])
def test_server_matches_single_adapter_models(setup, four_bit):
    settings = GenerationSettings(max_new_tokens=16)
    server = AdapterServer(
        setup / "base", {"alpha": setup / "alpha", "beta": setup / "beta"}, four_bit=four_bit, quant=FP32
    )
    ids = torch.tensor([render_prompt(PROMPT, server.tokenizer)])
    outputs = {}
    for name in ("alpha", "beta", None, "alpha"):  # switch back and forth: nothing sticks
        with server.using(name) as model, torch.no_grad():
            logits = model(input_ids=ids).logits
        single, tokenizer = load_base(setup / "base", four_bit=four_bit, quant=FP32)
        if name is not None:
            from qlorakit.lora import load_adapter

            load_adapter(single, setup / name)
        with torch.no_grad():
            torch.testing.assert_close(logits, single(input_ids=ids).logits, rtol=0, atol=1e-6)
        text = server.generate(PROMPT, name, settings)
        assert text == generate_text(single, tokenizer, PROMPT, settings)
        outputs[name] = text
    assert len({outputs["alpha"], outputs["beta"], outputs[None]}) == 3  # the adapters matter
    with pytest.raises(ModelError, match="no adapter named 'gamma'"):
        server.generate(PROMPT, "gamma", settings)
    with pytest.raises(ConfigError, match="already loaded"):
        server.add_adapter("alpha", setup / "beta")


def test_server_on_a_loaded_model_needs_a_tokenizer(tiny_llama, tiny_tokenizer):
    with pytest.raises(ConfigError, match="tokenizer"):
        AdapterServer(tiny_llama)
    server = AdapterServer(tiny_llama, tokenizer=tiny_tokenizer)
    assert server.adapter_names == []
    assert server.generate(PROMPT, settings=GenerationSettings(max_new_tokens=8)) == generate_text(
        tiny_llama, tiny_tokenizer, PROMPT, GenerationSettings(max_new_tokens=8)
    )


def test_base_is_built_with_the_quant_settings_saved_by_training(setup, tmp_path):
    """`qlorakit train` saves config.yaml beside the adapter; the 4-bit base is rebuilt the same way."""
    import shutil

    from qlorakit.eval.generation import adapter_quant_config
    from qlorakit.quant.linear import Linear4bit

    adapter = tmp_path / "alpha128"
    shutil.copytree(setup / "alpha", adapter)
    assert adapter_quant_config(adapter) is None
    (adapter / "config.yaml").write_text(
        "quant:\n  blocksize: 128\n  double_quant: false\n  compute_dtype: float32\n"
    )
    quant = adapter_quant_config(adapter)
    assert (quant.blocksize, quant.double_quant, quant.compute_dtype) == (128, False, "float32")
    server = AdapterServer(setup / "base", {"a": adapter})
    layers = [m for m in server.model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.quant_state.blocksize == 128 and m.quant_state.nested is None for m in layers)
    with pytest.warns(UserWarning, match=r"\['a'\] were trained against a 4-bit base built with other"):
        mixed = AdapterServer(setup / "base", {"plain": setup / "alpha", "a": adapter}, quant=None)
    assert all(m.quant_state.blocksize == 64 for m in mixed.model.modules() if isinstance(m, Linear4bit))
    (adapter / "config.yaml").write_text("quant:\n  blocksize: 100\n")
    with pytest.raises(ConfigError, match="blocksize"):
        adapter_quant_config(adapter)
