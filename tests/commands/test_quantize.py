"""`qlorakit quantize` end to end: a tiny real model folder, and (slow) the built-in SmolLM2-135M."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from helpers.tiny import make_tiny_llama
from qlorakit.cli import main
from qlorakit.eval.perplexity import builtin_eval_text, perplexity
from qlorakit.models.resolve import load_model
from qlorakit.quant.convert import quantized_layers
from qlorakit.quant.loading import load_quantized


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["quantize", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def printed_perplexities(out: str) -> tuple[float, float]:
    match = re.search(r"perplexity \(built-in text\): ([\d.]+) before -> ([\d.]+) after", out)
    assert match, out
    return float(match.group(1)), float(match.group(2))


def test_quantize_tiny_folder_end_to_end(capsys, tmp_path, tiny_model_dir, tiny_tokenizer):
    out_dir = tmp_path / "tiny-4bit"
    code, out, err = run_cli(capsys, str(tiny_model_dir), "--out", str(out_dir), "--compute-dtype", "float32")
    assert code == 0, err
    for needle in (
        "model size:",
        "x smaller",
        "bits per parameter",
        "overall weight error: rmse",
        "max|err|",
    ):
        assert needle in out
    assert "kept in full precision: lm_head (skipped)" in out
    assert "... 2 more layers" in out  # 14 layers: the table shows the 12 worst
    bits = float(re.search(r"([\d.]+) bits per parameter", out).group(1))
    assert 4.1 < bits < 4.2

    config = json.loads((out_dir / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_compute_dtype"] == "float32"
    assert (out_dir / "tokenizer.json").is_file()

    # the printed perplexities are those of the original model and of the folder that was written
    text = builtin_eval_text()
    original, _ = load_model(tiny_model_dir)
    quantized = load_quantized(out_dir, torch.float32)
    before, after = printed_perplexities(out)
    assert before == pytest.approx(perplexity(original, tiny_tokenizer, text).perplexity, abs=1e-3)
    assert after == pytest.approx(perplexity(quantized, tiny_tokenizer, text).perplexity, abs=1e-3)
    assert len(quantized_layers(quantized)) == 14


def test_options_reach_the_folder(capsys, tmp_path, tiny_model_dir):
    out_dir = tmp_path / "fp4"
    code, out, err = run_cli(
        capsys,
        str(tiny_model_dir),
        "--out", str(out_dir),
        "--quant-type", "fp4",
        "--blocksize", "128",
        "--no-double-quant",
        "--skip", "lm_head", "down_proj",
        "--no-perplexity",
    )  # fmt: skip
    assert code == 0, err
    assert "perplexity" not in out
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert (qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"]) == ("fp4", False)
    model = load_quantized(out_dir, torch.float32)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.quant_state.blocksize == 128 and layer.quant_state.nested is None
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert sorted(qc["llm_int8_skip_modules"]) == [
        "lm_head",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_bad_arguments_fail_with_a_message(capsys, tmp_path, tiny_model_dir):
    code, _, err = run_cli(capsys, str(tiny_model_dir), "--out", str(tmp_path / "o"), "--blocksize", "100")
    assert code == 2 and "--blocksize 100 must be a power of two" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    code, _, err = run_cli(capsys, str(tiny_model_dir), "--out", str(busy))
    assert code == 2 and "pass --overwrite" in err
    assert (busy / "keep.txt").read_text() == "x"
    code, _, err = run_cli(capsys, str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and "not found" in err
    assert not (tmp_path / "o").exists()


def test_a_4bit_folder_is_not_quantized_twice(capsys, tmp_path, tiny_tokenizer):
    from qlorakit.quant.convert import quantize_model, save_quantized

    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    quantize_model(model)
    folder = save_quantized(model, tiny_tokenizer, tmp_path / "q")
    code, _, err = run_cli(capsys, str(folder), "--out", str(tmp_path / "again"))
    assert code == 2 and "already a 4-bit folder" in err


@pytest.mark.slow
def test_quantize_smollm2_135m(capsys, tmp_path):
    out_dir = tmp_path / "smollm2-4bit"
    code, out, err = run_cli(capsys, "--out", str(out_dir))  # the default model
    assert code == 0, err
    print(out)
    before, after = printed_perplexities(out)
    assert math.isfinite(after) and 1 < before < 100
    assert before * 0.9 < after < before * 1.5  # 4-bit NF4 costs a few percent, not a broken model
    model, tokenizer = load_model(out_dir)
    assert len(quantized_layers(model)) == 30 * 7  # every projection; the tied head stays 16-bit
    reloaded = perplexity(model, tokenizer, builtin_eval_text()).perplexity
    assert reloaded == pytest.approx(after, rel=1e-2)
