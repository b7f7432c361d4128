"""The commands a user runs with a trained adapter: generate, chat, merge, export, eval."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.tiny import make_adapter, make_tiny_llama, make_tiny_tokenizer
from qlorakit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest
PROMPT = "What is 2 + 3?"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("use")
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    make_adapter(root / "base", root / "alpha", seed=1)
    make_adapter(root / "base", root / "beta", seed=2)
    rows = [
        {"instruction": "Reverse the word.", "input": "hello", "output": "olleh"},
        {"instruction": "What is 2 + 3?", "input": "", "output": "It is 5."},
    ]
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def server(setup: Path, four_bit: bool = True):
    from qlorakit.eval.serving import AdapterServer

    return AdapterServer(
        setup / "base", {"alpha": setup / "alpha", "beta": setup / "beta"}, four_bit=four_bit
    )


# ---------------------------------------------------------------------------------------------------------
# generate / chat


def test_generate_each_adapter_in_turn_and_selected(setup, capsys):
    from qlorakit.eval.generation import GenerationSettings

    args = [
        "generate",
        str(setup / "base"),
        "--adapter",
        str(setup / "alpha"),
        "--adapter",
        f"b={setup / 'beta'}",
    ]
    assert main([*args, "--prompt", PROMPT, "--max-new-tokens", "10", "--base-too"]) == 0
    out = capsys.readouterr().out
    srv = server(setup)
    settings = GenerationSettings(max_new_tokens=10)
    expected = "".join(
        f"=== {label} ===\n{srv.generate(PROMPT, name, settings)}\n"
        for label, name in (("base", None), ("alpha", "alpha"), ("b", "beta"))
    )
    assert out == expected
    assert main([*args, "--adapter-name", "b", "--prompt", PROMPT, "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == srv.generate(PROMPT, "beta", settings) + "\n"


def test_generate_16bit_sampling_and_errors(setup, capsys):
    from qlorakit.eval.generation import GenerationSettings

    base = ["generate", str(setup / "base"), "--adapter", str(setup / "alpha"), "--prompt", PROMPT, "--16bit"]
    sampled = [*base, "--temperature", "1.2", "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "8"]
    assert main(sampled) == 0
    first = capsys.readouterr().out
    settings = GenerationSettings(max_new_tokens=8, temperature=1.2, top_p=0.9, seed=3)
    assert first == server(setup, four_bit=False).generate(PROMPT, "alpha", settings) + "\n"
    assert main(sampled) == 0 and capsys.readouterr().out == first
    assert main([*base, "--adapter-name", "zeta"]) == 2
    assert "--adapter-name 'zeta'" in capsys.readouterr().err
    assert main(["generate", str(setup / "nowhere"), "--prompt", PROMPT]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_repl_streams_switches_and_keeps_history(setup):
    """Drive `qlorakit chat` through a pipe, as a user's terminal would."""
    from qlorakit.data import Message
    from qlorakit.eval.generation import GenerationSettings

    lines = [
        "hello",
        "/adapter beta",
        "hello",
        "/adapter nope",
        "/base",
        "/reset",
        "hello",
        "/quit",
        "ignored",
    ]
    cmd = [sys.executable, "-m", "qlorakit", "chat", str(setup / "base"), "--adapter", str(setup / "alpha")]
    cmd += ["--adapter", str(setup / "beta"), "--max-new-tokens", "8"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr

    srv = server(setup)
    settings = GenerationSettings(max_new_tokens=8)
    hello = Message("user", "hello")
    r1 = srv.generate([hello], "alpha", settings)
    r2 = srv.generate([hello, Message("assistant", r1.strip()), hello], "beta", settings)
    r3 = srv.generate([hello], None, settings)  # after /base and /reset
    expected = (
        f"{r1}\n[using adapter beta]\n{r2}\n[no adapter named 'nope'; loaded: alpha, beta]\n"
        f"[using the base model, adapters off]\n[conversation reset]\n{r3}\n"
    )
    assert proc.stdout == expected
    assert len({r1, r2, r3}) == 3


def test_chat_16bit_in_process_reads_until_end_of_input(setup, capsys, monkeypatch):
    from qlorakit.data import Message
    from qlorakit.eval.generation import GenerationSettings

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\n/adapters\n/help\nhi again\n"))
    assert (
        main(["chat", str(setup / "base"), "--16bit", "--max-new-tokens", "4", "--system", "Be brief."]) == 0
    )
    srv = server(setup, four_bit=False)
    settings = GenerationSettings(max_new_tokens=4)
    system, hi = Message("system", "Be brief."), Message("user", "hi")
    r1 = srv.generate([system, hi], None, settings)
    r2 = srv.generate(
        [system, hi, Message("assistant", r1.strip()), Message("user", "hi again")], None, settings
    )
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{r1}\n[loaded: none; active: base]\n[commands: /adapter NAME")
    assert captured.out.endswith(f"]\n{r2}\n")
    assert "[chat with" in captured.err


# ---------------------------------------------------------------------------------------------------------
# merge / export / eval


def test_merge_command(setup, tmp_path, capsys):
    out = tmp_path / "merged"
    args = ["merge", str(setup / "base"), "--adapter", str(setup / "alpha"), "--out", str(out)]
    assert main([*args, "--max-shard-size", "40KB", "--to", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "logit drift vs adapter on the 4-bit base" in printed and "peak merge buffer" in printed
    assert (out / "model.safetensors.index.json").is_file()
    AutoModelForCausalLM.from_pretrained(out)
    assert main([*args[:-1], str(tmp_path / "m4"), "--to", "nf4"]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "re-quantizes" in captured.err
    assert "logit drift vs adapter on the nf4 base" in captured.out


def test_merge_command_wrong_base(setup, tmp_path, capsys):
    tokenizer = make_tiny_tokenizer()
    other = make_tiny_llama(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=96)
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    adapter = make_adapter(tmp_path / "other", tmp_path / "other-adapter", seed=3)
    out = tmp_path / "merged"
    assert main(["merge", str(setup / "base"), "--adapter", str(adapter), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "different base model" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "other-adapter"]
    results = tmp_path / "results.json"
    data = str(setup / "val.jsonl")
    assert (
        main(["eval", str(setup / "base"), "--adapter", str(adapter), "--data", data, "--out", str(results)])
        == 2
    )
    assert "different base model" in capsys.readouterr().err and not results.exists()
    assert main(["generate", str(setup / "base"), "--adapter", str(adapter), "--prompt", PROMPT]) == 2
    assert "different base model" in capsys.readouterr().err


def test_export_errors_point_to_the_right_command(setup, tmp_path, capsys):
    base = str(setup / "base")
    assert main(["export", base, "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "supported formats: gguf, hf, bnb4" in capsys.readouterr().err
    assert main(["export", str(setup / "alpha"), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "qlorakit merge" in capsys.readouterr().err
    assert (
        main(["export", base, "--format", "gguf", "--dtype", "q4_k", "--out", str(tmp_path / "x.gguf")]) == 2
    )
    assert "f16, bf16, q8_0, f32" in capsys.readouterr().err
    assert main(["export", base, "--format", "hf", "--out", base]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert main(["export", base, "--format", "bnb4", "--out", str(tmp_path / "q4")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "q4"), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "4-bit" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "q4"]


def test_export_bnb4_loads_in_transformers_and_back_to_hf(setup, tmp_path, capsys):
    from qlorakit.quant.loading import load_quantized

    q4 = tmp_path / "q4"
    assert main(["export", str(setup / "base"), "--format", "bnb4", "--out", str(q4)]) == 0
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(0))
    ours = load_quantized(q4, torch.float32)
    bnb = AutoModelForCausalLM.from_pretrained(q4, dtype=torch.float32)  # transformers + bitsandbytes
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits.float(), bnb(input_ids=ids).logits.float()
    assert (a - b).abs().max() < 0.05
    dense = tmp_path / "dense"
    assert main(["export", str(q4), "--format", "hf", "--dtype", "fp32", "--out", str(dense)]) == 0
    assert "wrote" in capsys.readouterr().out
    with torch.no_grad():
        c = AutoModelForCausalLM.from_pretrained(dense)(input_ids=ids).logits
    assert (c - a).abs().max() < 0.05


def test_export_gguf_and_back_to_hf(setup, tmp_path, capsys, monkeypatch):
    """Dense folder -> GGUF (f32) -> dense folder again: the weights survive the round trip."""
    from gguf import GGUFReader

    monkeypatch.setenv("QLORAKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "model.gguf"
    assert main(["export", str(setup / "base"), "--format", "gguf", "--dtype", "f32", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    original = AutoModelForCausalLM.from_pretrained(setup / "base").state_dict()
    assert len(GGUFReader(str(out)).tensors) == len(original)
    dense = tmp_path / "from-gguf"
    assert main(["export", str(out), "--format", "hf", "--dtype", "fp32", "--out", str(dense)]) == 0
    capsys.readouterr()
    back = AutoModelForCausalLM.from_pretrained(dense).state_dict()
    assert set(back) == set(original)
    for key, value in original.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)


def test_export_gguf_unsupported_architecture(tmp_path, capsys):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )
    model.save_pretrained(tmp_path / "neox")
    make_tiny_tokenizer().save_pretrained(tmp_path / "neox")
    out = tmp_path / "neox.gguf"
    assert main(["export", str(tmp_path / "neox"), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "GPTNeoXForCausalLM cannot be exported to GGUF" in err and "LlamaForCausalLM" in err
    assert not out.exists()


def test_eval_command(setup, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = [
        "eval",
        str(setup / "base"),
        "--adapter",
        str(setup / "alpha"),
        "--data",
        str(setup / "val.jsonl"),
    ]
    assert main([*args, "--compare-base", "--max-new-tokens", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "exact_match" in printed and "base" in printed and "adapted" in printed
    saved = json.loads(out.read_text())
    assert [r["label"] for r in saved["results"]] == ["base", "adapted"]
    assert saved["results"][0]["loss"] != saved["results"][1]["loss"]
    assert main(["eval", str(setup / "base"), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
