"""Quantizing while loading: the same model as from_pretrained + quantize_model, with a lower memory peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from helpers.tiny import make_tiny_llama
from qlorakit.config import QuantConfig
from qlorakit.core.errors import QuantizationError
from qlorakit.models.resolve import load_model
from qlorakit.quant.convert import quantize_model, save_quantized
from qlorakit.quant.linear import Linear4bit
from qlorakit.quant.loading import load_quantizing


def _reference(folder: Path, quant: QuantConfig, dtype: torch.dtype) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    quantize_model(model, quant.to_settings(dtype))
    return model.eval()


def _assert_same_model(got: torch.nn.Module, want: torch.nn.Module) -> None:
    assert [type(m) for m in got.modules()] == [type(m) for m in want.modules()]
    g, w = got.state_dict(), want.state_dict()
    assert g.keys() == w.keys()
    for key in w:
        assert g[key].dtype == w[key].dtype and torch.equal(g[key], w[key]), key
    for (name, a), (_, b) in zip(got.named_modules(), want.named_modules(), strict=True):
        if isinstance(b, Linear4bit):
            assert a.compute_dtype == b.compute_dtype and a.quant_state.dtype == b.quant_state.dtype, name
    ids = torch.randint(4, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, want(input_ids=ids).logits)


@pytest.mark.parametrize(
    "stored, compute, tied, quant",
    [
        (torch.bfloat16, torch.float32, False, QuantConfig()),
        (torch.float32, torch.float32, True, QuantConfig()),
        (
            torch.float32,
            torch.bfloat16,
            False,
            QuantConfig(quant_type="fp4", double_quant=False, blocksize=128),
        ),
        (torch.bfloat16, torch.float32, False, QuantConfig(skip=["lm_head", "down_proj"])),
    ],
)
def test_same_model_as_load_then_quantize(tmp_path, stored, compute, tied, quant):
    folder = tmp_path / "m"
    make_tiny_llama(tie_word_embeddings=tied, dtype=stored).save_pretrained(folder)
    got = load_quantizing(folder, quant.to_settings(compute))
    _assert_same_model(got, _reference(folder, quant, compute))
    assert not got.training
    if "down_proj" in quant.skip:
        assert type(got.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_gpt2_conv1d(tmp_path):
    config = transformers.GPT2Config(
        vocab_size=320, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    got = load_quantizing(tmp_path / "gpt2", QuantConfig().to_settings(torch.float32))
    _assert_same_model(got, _reference(tmp_path / "gpt2", QuantConfig(), torch.float32))


def test_renamed_keys_fall_back_to_transformers(tmp_path, tiny_tokenizer):
    """A checkpoint whose names are not the model's: load_quantizing declines, load_model still works."""
    folder = tmp_path / "m"
    make_tiny_llama(vocab_size=len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.extra_unused.weight"] = torch.zeros(3)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert load_quantizing(folder, QuantConfig().to_settings(torch.float32)) is None
    model, _ = load_model(folder, dtype=torch.float32, quantize=QuantConfig())
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)


def test_load_model_quantize_matches_and_rejects_auto(tmp_path, tiny_tokenizer):
    folder = tmp_path / "m"
    make_tiny_llama(vocab_size=len(tiny_tokenizer), dtype=torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    model, _ = load_model(folder, dtype=torch.float32, quantize=QuantConfig())
    _assert_same_model(model, _reference(folder, QuantConfig(), torch.float32))
    with pytest.raises(Exception, match="torch dtype"):
        load_model(folder, dtype="auto", quantize=QuantConfig())


def test_a_4bit_folder_is_not_requantized(tmp_path, tiny_tokenizer):
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    quantize_model(model, QuantConfig().to_settings(torch.float32))
    out = save_quantized(model, tiny_tokenizer, tmp_path / "q")
    with pytest.raises(QuantizationError, match="already 4-bit"):
        load_quantizing(out, QuantConfig().to_settings(torch.float32))


_PEAK = """
import os, sys, torch
import transformers, transformers.models.llama.modeling_llama  # imported before the baseline
from qlorakit.config import QuantConfig
from qlorakit.models.resolve import load_model
from qlorakit.quant import convert, loading
from qlorakit.core.memory import configure_allocator
configure_allocator()  # as the command line does: freed tensors leave the resident set
def status(field):  # KiB; VmHWM is this process's own peak (ru_maxrss would include the forking parent's)
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1])
base = status("VmRSS")
if sys.argv[2] == "stream":
    load_model(sys.argv[1], dtype=torch.float32, quantize=QuantConfig())
else:
    m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    convert.quantize_model(m, QuantConfig().to_settings(torch.float32))
print((status("VmHWM") - base) * 1024)
"""


@pytest.mark.slow
def test_peak_memory_is_far_below_a_full_precision_load(tmp_path, tiny_tokenizer):
    """~230 MB of fp32 linear weights (bf16 on disk): streaming adds far less to peak RSS than loading them."""
    folder = tmp_path / "m"
    model = make_tiny_llama(
        vocab_size=len(tiny_tokenizer), hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=8,
        num_kv_heads=8, dtype=torch.bfloat16,
    )  # fmt: skip
    linear_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "layers" in n and p.dim() == 2)
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    json.loads((folder / "config.json").read_text())  # a plain full-precision folder
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    peaks = {}
    for how in ("stream", "full"):
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_PEAK), str(folder), how],
            capture_output=True,
            text=True,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        peaks[how] = int(out.stdout.strip().splitlines()[-1])
    assert peaks["full"] > 0.8 * linear_bytes, peaks  # the full-precision path holds every fp32 weight
    assert peaks["stream"] < 0.25 * peaks["full"], peaks
