"""Whole-model quantization and 4-bit folders, checked against real transformers + bitsandbytes on CPU.

Interop (all on tiny real Llama models; bitsandbytes 0.50 quantizes and runs 4-bit layers on the CPU):
(a) a folder written by qlorakit loads in `AutoModelForCausalLM.from_pretrained` and gives the same logits;
(b) a folder written by transformers+bitsandbytes loads with `load_quantized`, bytes untouched, same logits;
(c) both write the same tensors, byte for byte, and the same `quantization_config`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from helpers.tiny import bnb_reference_logits, make_tiny_llama
from qlorakit.core.errors import CheckpointError, QuantizationError
from qlorakit.quant.blockwise import dequantize_4bit, quantize_4bit
from qlorakit.quant.convert import (
    bnb_quantization_config,
    quantize_model,
    quantized_layers,
    save_quantized,
)
from qlorakit.quant.linear import Linear4bit
from qlorakit.quant.loading import load_quantized
from qlorakit.quant.settings import QuantSettings

pytestmark = pytest.mark.dtype_sensitive

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

# Both sides dequantize to the same fp32 weight and run an fp32 matmul (the models are fp32 and every folder
# says bnb_4bit_compute_dtype float32; bitsandbytes runs its training path, see `bnb_reference_logits`, so
# no CPU-specific bf16 kernel is involved): any difference is matmul summation order, far below this.
LOGIT_ATOL = 1e-5


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids(tiny_tokenizer) -> torch.Tensor:
    return torch.tensor([tiny_tokenizer("Hello, how are you? The quick brown fox jumps.")["input_ids"]])


@pytest.fixture(scope="module")
def original_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("orig") / "tiny"
    make_tiny_llama(vocab_size=len(tiny_tokenizer), seed=1).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bnb_model(original_dir):
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return transformers.AutoModelForCausalLM.from_pretrained(
        original_dir, quantization_config=config, device_map="cpu", dtype=torch.float32
    )


@pytest.fixture(scope="module")
def bnb_dir(bnb_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bnb") / "tiny-bnb"
    bnb_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ours(original_dir, tiny_tokenizer, tmp_path_factory):
    model = transformers.AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32)
    report = quantize_model(model, QuantSettings(compute_dtype=torch.float32))
    out = save_quantized(model, tiny_tokenizer, tmp_path_factory.mktemp("ours") / "tiny-4bit")
    return model, report, out


def test_config_entry_equals_bitsandbytes_config(tmp_path):
    for quant_type, dq, dtype, skip in [
        ("nf4", True, torch.bfloat16, None),
        ("fp4", False, torch.float32, ["lm_head", "model.layers.0.mlp.down_proj"]),
        ("nf4", False, torch.float16, []),
    ]:
        expected = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=dq,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip,
        ).to_dict()
        got = bnb_quantization_config(
            quant_type=quant_type, double_quant=dq, compute_dtype=dtype, skip_modules=skip
        )
        assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)


def test_c_same_tensors_and_config_as_transformers_bitsandbytes(ours, bnb_dir):
    _, _, ours_dir = ours
    theirs, mine = read_all(bnb_dir), read_all(ours_dir)
    assert sorted(mine) == sorted(theirs)
    assert any(k.endswith(".weight.quant_state.bitsandbytes__nf4") for k in mine)
    for key, t in theirs.items():
        assert mine[key].dtype == t.dtype and mine[key].shape == t.shape, key
        assert torch.equal(mine[key], t), (
            key
        )  # packed nibbles, absmax codes, maps, JSON bytes, norms, embeddings
    config_ours = json.loads((ours_dir / "config.json").read_text())
    config_theirs = json.loads((bnb_dir / "config.json").read_text())
    assert config_ours == config_theirs
    assert (ours_dir / "config.json").read_text() == (bnb_dir / "config.json").read_text()
    with (
        safe_open(ours_dir / "model.safetensors", "pt") as a,
        safe_open(bnb_dir / "model.safetensors", "pt") as b,
    ):
        assert a.metadata() == b.metadata()


def test_a_transformers_loads_our_folder_with_same_logits(ours, ids):
    model, _, ours_dir = ours
    import bitsandbytes as bnb

    hf = transformers.AutoModelForCausalLM.from_pretrained(ours_dir, device_map="cpu")
    assert isinstance(hf.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert type(hf.lm_head) is nn.Linear
    torch.testing.assert_close(bnb_reference_logits(hf, ids), logits(model, ids), atol=LOGIT_ATOL, rtol=0)


def test_b_load_quantized_reads_transformers_folder_without_requantizing(bnb_model, bnb_dir, ids):
    model = load_quantized(bnb_dir, compute_dtype=torch.float32)
    stored = read_all(bnb_dir)
    layers = quantized_layers(model)
    assert len(layers) == 14
    for name, layer in layers:
        assert torch.equal(layer.packed, stored[f"{name}.weight"]), name
        assert torch.equal(layer.packed, bnb_model.get_submodule(name).weight.data), name
    assert not model.training
    torch.testing.assert_close(
        logits(model, ids), bnb_reference_logits(bnb_model, ids), atol=LOGIT_ATOL, rtol=0
    )


def test_round_trip_is_exact(ours, ids):
    model, _, ours_dir = ours
    loaded = load_quantized(ours_dir, compute_dtype=torch.float32)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    before = dict(quantized_layers(model))
    for name, layer in quantized_layers(loaded):
        assert torch.equal(layer.packed, before[name].packed)
        assert torch.equal(layer.quant_state.real_absmax(), before[name].quant_state.real_absmax())
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    # dtype casts only the full-precision tensors
    cast = load_quantized(ours_dir, compute_dtype=torch.float32, dtype=torch.bfloat16)
    assert cast.model.embed_tokens.weight.dtype == torch.bfloat16
    assert cast.model.layers[0].mlp.up_proj.packed.dtype == torch.uint8


def test_report_matches_hand_computation(original_dir, ours):
    _, report, _ = ours
    original = load_file(original_dir / "model.safetensors")
    quantized = dict(quantized_layers(ours[0]))
    assert [layer.name for layer in report.layers] == sorted(
        quantized, key=[lr.name for lr in report.layers].index
    )
    assert report.skipped == (("lm_head", "skipped"),)
    for layer in report.layers:
        w = original[f"{layer.name}.weight"]
        deq = quantized[layer.name].dequantize(torch.float32)
        assert layer.rmse == pytest.approx(float((deq - w).double().square().mean().sqrt()), rel=1e-6)
        assert layer.max_abs_err == pytest.approx(float((deq - w).abs().max()), rel=1e-6)
        n = w.numel()
        nblocks = math.ceil(n / 64)
        assert layer.bits_per_parameter == pytest.approx(
            4 + (8 * nblocks + 32 * math.ceil(nblocks / 256)) / n
        )
        assert layer.bytes_before == 4 * n
    assert 4.12 < report.bits_per_parameter < 4.15
    assert report.model_bytes_after < report.model_bytes_before


@pytest.mark.parametrize(
    ("quant_type", "double_quant", "blocksize"), [("fp4", False, 64), ("nf4", True, 128), ("nf4", False, 256)]
)
def test_other_settings_load_in_transformers(
    tmp_path, tiny_tokenizer, ids, quant_type, double_quant, blocksize
):
    # Rows a multiple of the blocksize: bitsandbytes 0.50's CPU dequantize kernel mis-reads blocks that
    # straddle two rows (in_features % blocksize != 0), although the stored bytes are the same.
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer), hidden_size=256, intermediate_size=512, seed=2)
    quantize_model(
        model,
        QuantSettings(
            quant_type=quant_type, double_quant=double_quant, blocksize=blocksize, compute_dtype=torch.float32
        ),
    )
    out = save_quantized(model, None, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"]) == (quant_type, double_quant)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    torch.testing.assert_close(bnb_reference_logits(hf, ids), logits(model, ids), atol=LOGIT_ATOL, rtol=0)
    assert torch.equal(logits(load_quantized(out, torch.float32), ids), logits(model, ids))


def test_extra_skips_are_written_so_transformers_keeps_them(tmp_path, tiny_tokenizer, ids):
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer), seed=4)
    report = quantize_model(
        model,
        QuantSettings(
            skip=("lm_head", "mlp.down_proj", "model.layers.1.self_attn.q_proj"), compute_dtype=torch.float32
        ),
    )
    assert {name for name, _ in report.skipped} == {
        "lm_head",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
    }
    assert type(model.model.layers[1].self_attn.q_proj) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    out = save_quantized(model, tiny_tokenizer, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(qc["llm_int8_skip_modules"]) == sorted(name for name, _ in report.skipped)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(hf.model.layers[0].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(bnb_reference_logits(hf, ids), logits(model, ids), atol=LOGIT_ATOL, rtol=0)
    loaded = load_quantized(out, torch.float32)
    assert type(loaded.model.layers[0].mlp.down_proj) is nn.Linear
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_quantizing_the_head_writes_an_empty_skip_list(tmp_path, tiny_tokenizer, ids):
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer), seed=5)
    quantize_model(model, QuantSettings(skip=(), compute_dtype=torch.float32))
    assert isinstance(model.lm_head, Linear4bit)
    out = save_quantized(model, None, tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"] == []
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    torch.testing.assert_close(bnb_reference_logits(hf, ids), logits(model, ids), atol=LOGIT_ATOL, rtol=0)


def test_tied_embeddings_are_never_quantized(tmp_path, tiny_tokenizer, ids):
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer), tie_word_embeddings=True, seed=6)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = quantize_model(model, QuantSettings(skip=(), compute_dtype=torch.float32))
    assert report.skipped == (("lm_head", "tied to an embedding"),)
    out = save_quantized(model, None, tmp_path / "q")
    assert "lm_head.weight" not in read_all(out)
    loaded = load_quantized(out, torch.float32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    torch.testing.assert_close(bnb_reference_logits(hf, ids), logits(model, ids), atol=LOGIT_ATOL, rtol=0)


def test_gpt2_conv1d_layers(tmp_path, ids):
    config = transformers.GPT2Config(
        vocab_size=320, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    reference = copy.deepcopy(model)
    conv_weight = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: [in, out]
    report = quantize_model(model, QuantSettings(compute_dtype=torch.float32))
    assert len(report.layers) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, Linear4bit) and (layer.out_features, layer.in_features) == (192, 64)
    packed, state = quantize_4bit(conv_weight.t().contiguous())
    assert torch.equal(layer.packed, packed)
    assert torch.equal(layer.dequantize(), dequantize_4bit(packed, state))
    # the same GPT-2 with each Conv1D weight replaced by its dequantized [in, out] form
    for name, q in quantized_layers(model):
        reference.get_submodule(name).weight.data = q.dequantize().t().contiguous()
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=LOGIT_ATOL, rtol=0)
    out = save_quantized(model, None, tmp_path / "gpt2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    torch.testing.assert_close(bnb_reference_logits(hf, ids), logits(model, ids), atol=LOGIT_ATOL, rtol=0)
    assert torch.equal(logits(load_quantized(out, torch.float32), ids), logits(model, ids))


def test_sharded_folder(tmp_path, tiny_tokenizer, ids):
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer), seed=7)
    quantize_model(model, QuantSettings(compute_dtype=torch.float32))
    out = save_quantized(model, tiny_tokenizer, tmp_path / "q", max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    assert torch.equal(logits(load_quantized(out, torch.float32), ids), logits(model, ids))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    torch.testing.assert_close(bnb_reference_logits(hf, ids), logits(model, ids), atol=LOGIT_ATOL, rtol=0)


def test_original_weights_are_freed_layer_by_layer(tiny_tokenizer):
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer), seed=8)
    freed_when: dict[str, int] = {}

    def count_4bit() -> int:
        return sum(isinstance(m, Linear4bit) for m in model.modules())

    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    for name in names:
        weakref.finalize(
            model.get_submodule(name).weight, lambda n=name: freed_when.__setitem__(n, count_4bit())
        )
    quantize_model(model, QuantSettings(compute_dtype=torch.float32))
    # the k-th layer's weight is gone before the (k+1)-th layer is quantized
    assert [freed_when.get(n) for n in names] == list(range(1, len(names) + 1))


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    import psutil, torch
    from helpers.tiny import make_tiny_llama
    from qlorakit.quant.convert import quantize_model
    from qlorakit.quant.settings import QuantSettings

    # warm-up on a tiny model: lazy imports and the compiled CPU kernels are loaded outside the measurement
    quantize_model(make_tiny_llama(), QuantSettings(compute_dtype=torch.float32))
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: no fp32 copy before the measurement
    model = make_tiny_llama(hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8,
                            num_kv_heads=4, dtype=torch.bfloat16)
    torch.set_default_dtype(torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    proc = psutil.Process()
    peak, done = [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)
    before = proc.memory_info().rss
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    thread = threading.Thread(target=sample); thread.start()
    report = quantize_model(model, QuantSettings(compute_dtype=torch.float32))
    done.set(); thread.join()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_rss = max(peak[0], maxrss_after if maxrss_after > maxrss_before else 0)
    print(json.dumps({"model_bytes": model_bytes, "before": before, "peak": peak_rss,
                      "after": proc.memory_info().rss, "quantized_bytes": report.bytes_before}))
    """
)


@pytest.mark.slow  # a fresh interpreter importing torch + transformers
def test_peak_memory_stays_below_two_16bit_copies(tmp_path):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed blocks go back to the OS at once
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT)
    tests_dir = str(Path(__file__).resolve().parents[1])
    run = subprocess.run(
        [sys.executable, str(script), tests_dir], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    assert m["model_bytes"] > 20 * 2**20  # a model of a few tens of MB in bf16
    # The model alone is one 16-bit copy; quantizing adds a few layers' temporaries, never a second copy
    # (nor half of one).
    assert m["peak"] - m["before"] < 0.5 * m["model_bytes"], m
    # The original bf16 weights were released: the process shrank by most of their size.
    assert m["before"] - m["after"] > 0.5 * m["quantized_bytes"], m


def _rewrite(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    with safe_open(path, "pt") as fh:
        metadata = fh.metadata()
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def test_bad_folders_raise_checkpoint_errors(ours, original_dir, tmp_path):
    import shutil

    _, _, ours_dir = ours
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_quantized(tmp_path)
    with pytest.raises(CheckpointError, match="no 4-bit weights"):
        load_quantized(original_dir)

    missing = tmp_path / "missing"
    shutil.copytree(ours_dir, missing)
    _rewrite(missing, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing key 'model\.norm\.weight'"):
        load_quantized(missing)

    unexpected = tmp_path / "unexpected"
    shutil.copytree(ours_dir, unexpected)
    _rewrite(unexpected, lambda t: t.__setitem__("model.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected key 'model\.extra\.weight'"):
        load_quantized(unexpected)

    no_absmax = tmp_path / "no_absmax"
    shutil.copytree(ours_dir, no_absmax)
    _rewrite(no_absmax, lambda t: t.pop("model.layers.1.mlp.up_proj.weight.absmax"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight\.absmax"):
        load_quantized(no_absmax)


def test_nothing_to_quantize_and_bad_skip(tiny_tokenizer):
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    with pytest.raises(QuantizationError, match="string"):
        QuantSettings(skip="lm_head")
    with pytest.raises(QuantizationError, match="no linear layer"):
        quantize_model(nn.Sequential(nn.Embedding(4, 4)))
    with pytest.raises(QuantizationError, match="quantize_model"):
        save_quantized(model, None, "/nonexistent/never-written")


def test_resaving_a_transformers_folder_keeps_every_byte(bnb_dir, tmp_path):
    model = load_quantized(bnb_dir, compute_dtype=torch.float32)
    out = save_quantized(model, None, tmp_path / "resaved")
    theirs, mine = read_all(bnb_dir), read_all(out)
    assert sorted(mine) == sorted(theirs)
    assert all(torch.equal(mine[k], theirs[k]) and mine[k].dtype == theirs[k].dtype for k in theirs)
    assert (out / "config.json").read_text() == (bnb_dir / "config.json").read_text()
