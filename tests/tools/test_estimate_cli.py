"""The `qlorakit estimate` command: model specs and configs it reads, options and overrides, advice, the
batch shapes it replays, and a real run of a shape it was not calibrated on."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from helpers.configs import LLAMA2_7B
from qlorakit.config import Config, load_config
from qlorakit.core.dtypes import format_bytes, parse_size
from qlorakit.core.errors import ConfigError
from qlorakit.models.shape import ModelShape
from qlorakit.tools.estimate.advice import RunSettings, advise
from qlorakit.tools.estimate.kernel_cache import KERNEL_BYTES, BatchShape, RunShapes, linear_kernels
from qlorakit.tools.estimate.memory import estimate_memory

pytestmark = pytest.mark.dtype_sensitive


def test_from_config_accepts_folder_json_yaml_and_builtin(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model:\n  name: m\ntrain:\n  lr: 0.0002\n")
    by_dict = ModelShape.from_config(LLAMA2_7B)
    assert ModelShape.from_config(folder) == by_dict
    assert ModelShape.from_config(folder / "config.json") == by_dict
    assert ModelShape.from_config(yaml_file) == by_dict  # relative to the YAML file
    smol = ModelShape.from_config("smollm2-135m")
    assert (smol.hidden_size, smol.num_layers, smol.num_heads, smol.num_kv_heads) == (576, 30, 9, 3)
    assert (smol.intermediate_size, smol.vocab_size, smol.tie_word_embeddings) == (1536, 49152, True)
    assert smol.checkpoint_format == "gguf"


def test_bad_inputs_raise_config_errors(tmp_path):
    shape = ModelShape.from_config(LLAMA2_7B)
    with pytest.raises(ConfigError, match="method"):
        estimate_memory(shape, method="dora", batch=1, seq=8)
    with pytest.raises(ConfigError, match="dtype"):
        estimate_memory(shape, method="lora", batch=1, seq=8, compute_dtype="int3")
    with pytest.raises(ConfigError, match="match no linear"):
        estimate_memory(shape, method="lora", batch=1, seq=8, targets=["c_attn"])
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelShape.from_config({"model_type": "llama", "vocab_size": 3})
    with pytest.raises(ConfigError, match="model.name"):
        (tmp_path / "c.yaml").write_text("train: {}\n")
        ModelShape.from_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="8GiB"):
        parse_size("lots")


def test_parse_and_format_sizes():
    assert parse_size("8GiB") == 8 * 2**30
    assert parse_size("16GB") == 16 * 10**9
    assert parse_size("512 MiB") == 512 * 2**20
    assert format_bytes(3 * 2**30 // 2) == "1.50 GiB"
    assert format_bytes(512) == "512 B"


def test_advice_is_monotonic_in_the_budget():
    shape = ModelShape.from_config({**LLAMA2_7B, "torch_dtype": "bfloat16"})  # loaded in place
    small = advise(shape, parse_size("10GiB"), seq=512)
    large = advise(shape, parse_size("48GiB"), seq=512)
    by_method = {m.method: m for m in small.methods}
    assert not by_method["full"].fits and not by_method["lora"].fits and by_method["qlora"].fits
    assert small.recommended.method == "qlora"
    assert by_method["qlora"].peak_bytes <= parse_size("10GiB")
    for a, b in zip(small.methods, large.methods, strict=True):
        assert b.max_batch >= a.max_batch and b.max_seq >= a.max_seq
    assert large.recommended.method == "lora"
    assert all(m.max_seq <= 4096 for m in large.methods)  # capped at the model's context
    # what advise reports fitting does fit, and twice the batch does not
    q = by_method["qlora"]
    nxt = estimate_memory(
        shape, method="qlora", batch=2 * q.max_batch, seq=512, grad_checkpointing=q.grad_checkpointing
    )
    assert nxt.required > parse_size("10GiB")


def test_cli_prints_the_table_and_advice(tmp_path, capsys):
    from qlorakit.cli import main

    (tmp_path / "config.json").write_text(json.dumps({**LLAMA2_7B, "torch_dtype": "bfloat16"}))
    assert main(["estimate", str(tmp_path), "--batch", "1", "--seq", "512", "--budget", "10GiB"]) == 0
    out = capsys.readouterr().out
    for text in (
        "full",
        "lora",
        "qlora",
        "Weights",
        "Optimizer states",
        "Peak RSS (estimate)",
        "Must fit in RAM",
        "Allocator-held",
        "-> use qlora",
        "GiB",
    ):
        assert text in out
    assert main(["estimate", str(tmp_path), "--method", "qlora", "--no-grad-checkpointing"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Component"))
    assert header.split()[1:] == ["qlora"]
    assert main(["estimate", str(tmp_path / "missing")]) == 2


def test_a_gguf_is_converted_once_then_streams():
    cfg = {**LLAMA2_7B, "hidden_size": 512, "intermediate_size": 1024, "_checkpoint_format": "gguf"}
    fresh = estimate_memory(ModelShape.from_config(cfg), method="qlora", batch=1, seq=8)
    cached = estimate_memory(
        ModelShape.from_config({**cfg, "_gguf_converted": True}), method="qlora", batch=1, seq=8
    )
    n = ModelShape.from_config(cfg).num_params()
    assert fresh.loading == fresh.components["runtime"] + n * 4  # the fp32 model the first conversion builds
    assert cached.loading < fresh.loading and cached.loading_file_pages == 0


def _run_yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_a_training_config_is_estimated_with_its_own_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORAKIT_MALLOC_TUNING", "mmap")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA2_7B))
    yaml_file = _run_yaml(
        tmp_path,
        "model: {name: m}\nquant: {enabled: false, compute_dtype: float32}\n"
        "lora: {r: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}\ndata: {max_length: 128}\n"
        "train: {batch_size: 2, grad_accum: 8, gradient_checkpointing: false, optim: paged_adamw_8bit}\n",
    )
    settings = RunSettings.from_config(load_config(yaml_file))
    assert (settings.method, settings.batch, settings.seq, settings.r) == ("lora", 2, 128, 8)
    assert settings.targets == ("q_proj", "v_proj") and settings.grad_checkpointing is False
    assert (settings.compute_dtype, settings.optimizer, settings.allocator) == (
        "float32",
        "adamw_8bit",
        "mmap",
    )
    shape = ModelShape.from_config(yaml_file)
    want = estimate_memory(
        shape, method="lora", batch=2, seq=128, r=8, targets=["q_proj", "v_proj"], grad_checkpointing=False,
        compute_dtype="float32", optimizer="adamw_8bit", lora_dropout=0.0, allocator="mmap",
    )  # fmt: skip
    assert settings.estimate(shape) == want
    # a regex target selects the linears PEFT would (matched against the layer's module paths)
    regex = load_config(yaml_file, ["--lora.target_modules=.*\\.(q|v)_proj"])
    assert RunSettings.from_config(regex).estimate(shape) == want


def test_auto_compute_dtype_is_what_training_resolves_on_this_cpu(monkeypatch):
    from qlorakit.quant.linear import cpu_has_native_bf16

    for flag, dtype in (("1", "bfloat16"), ("0", "float32")):
        monkeypatch.setenv("QLORAKIT_CPU_BF16", flag)
        cpu_has_native_bf16.cache_clear()
        try:
            assert RunSettings.from_config(Config()).compute_dtype == dtype
        finally:
            cpu_has_native_bf16.cache_clear()


def test_16bit_kernels_are_counted_per_batch_shape():
    shape = ModelShape.from_config(LLAMA2_7B)
    one = RunShapes(frozenset({BatchShape(4, 256, 4 * 255)}))
    many = RunShapes(frozenset(BatchShape(4, n, 4 * (n - 1)) for n in range(200, 257, 8)))

    def kernels(dtype: str, shapes: RunShapes) -> int:
        est = estimate_memory(
            shape, method="qlora", batch=4, seq=256, r=16, compute_dtype=dtype, shapes=shapes
        )
        return est.components["kernels"]

    assert kernels("float32", many) == 0  # fp32 matmuls compile nothing
    assert kernels("bfloat16", RunShapes.uniform(4, 256)) == kernels("bfloat16", None)
    per_shape = linear_kernels(shape, shape.layer_linears(), True, 64, train=True, full=False)
    # 7 more token counts, each with its linear kernels, two attention kernels and the head's two block
    # shapes (vocabulary 32000 = 7 x 4096 + 3328), forward and backward
    assert kernels("bfloat16", many) - kernels("bfloat16", one) == 7 * (per_shape + 2 + 2 * 2) * KERNEL_BYTES


def test_a_llama_layer_compiles_one_kernel_per_distinct_matmul():
    # smollm2-135m's layer: q/o 576x576, k/v 576x192, gate/up 576x1536, down 1536x576 (no 4-bit chunking)
    smol = ModelShape.from_config({**LLAMA2_7B, "hidden_size": 576, "intermediate_size": 1536,
                                   "num_attention_heads": 9, "num_key_value_heads": 3})  # fmt: skip
    linears = smol.layer_linears()
    # forward and input gradient per (in, out) pair: 4 + 4; LoRA: 3 per distinct in (2), 3 per out (3)
    assert linear_kernels(smol, linears, True, 64, train=True, full=False) == 8 + 3 * 2 + 3 * 3
    assert linear_kernels(smol, linears, True, 64, train=False, full=False) == 4 + 2 + 3
    # a 4-bit 4096 x 11008 weight is dequantized in row / column chunks: more kernel shapes than 16-bit
    seven = ModelShape.from_config(LLAMA2_7B)
    quantized = linear_kernels(seven, [], True, 64, train=False, full=False)
    assert quantized > linear_kernels(seven, [], False, 64, train=False, full=False)


def test_cli_reads_the_config_and_lets_options_and_overrides_win(tmp_path, capsys):
    from qlorakit.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA2_7B))
    yaml_file = _run_yaml(
        tmp_path, "model: {name: m}\nlora: {r: 8}\ndata: {max_length: 128}\ntrain: {batch_size: 2}\n"
    )
    assert main(["estimate", str(yaml_file), "--no-data"]) == 0
    out = capsys.readouterr().out
    assert "batch 2 x seq 128" in out and "r=8" in out
    assert next(line for line in out.splitlines() if line.startswith("Component")).split()[1:] == ["qlora"]
    argv = [
        "estimate",
        str(yaml_file),
        "--no-data",
        "--batch",
        "3",
        "--lora.r=32",
        "--train.gradient_checkpointing=false",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "batch 3 x seq 128" in out and "r=32" in out and "checkpointing off" in out
    assert main(["estimate", str(yaml_file), "--no-data", "--method", "all"]) == 0
    assert "full" in capsys.readouterr().out


def test_cli_refuses_bad_options_before_printing_anything(tmp_path, capsys):
    from qlorakit.cli import main

    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    assert main(["estimate", str(tmp_path), "--budget", "8 potatoes", "--batch", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--budget" in captured.err and "--batch must be a positive integer" in captured.err
    yaml_file = _run_yaml(tmp_path, f"model: {{name: {tmp_path}}}\n")
    assert main(["estimate", str(yaml_file), "--no-data", "--lora.rank=4"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "lora.rank: unknown key" in captured.err


def test_replayed_shapes_are_the_batches_the_training_loop_builds(tmp_path, tiny_tokenizer):
    from qlorakit.data import build_datasets
    from qlorakit.tools.estimate.run_shapes import run_shapes
    from qlorakit.train.distributed import DistContext
    from qlorakit.train.loop import _micro_batches
    from qlorakit.train.recipe import _collate_fn
    from qlorakit.train.sampler import BatchOrder

    rows = [{"text": " ".join(["the quick brown fox"] * (3 + i % 11))} for i in range(40)]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(None, [f"--data.datasets=[{{path: '{data}', format: text}}]", "--data.template=text",
                             "--train.max_steps=7", "--train.batch_size=3", "--train.grad_accum=2"])  # fmt: skip
    shapes = run_shapes(cfg, tiny_tokenizer, 8)
    bundle = build_datasets(cfg.data, tiny_tokenizer, seed=cfg.train.seed)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    order, seen = BatchOrder(len(bundle.train), cfg.train.seed), set()
    for step in range(7):
        position = step * 3 * 2
        for batch in _micro_batches(
            bundle.train, order, _collate_fn(tiny_tokenizer), position, cfg.train, ctx
        ):
            labels = int((batch["labels"][:, 1:] != -100).sum())
            seen.add(BatchShape(*batch["input_ids"].shape, labels))
    assert shapes.train == seen and shapes.source == "data"


# A Llama shape none of the estimate's constants was measured on (they come from SmolLM2-135M, the tiny
# 2-layer test Llama and a hidden-512, 4-layer Llama): big enough that the model, not the ~385 MiB of the
# Python process, decides most of the peak. Without gradient checkpointing the activations of 4 x 512
# tokens are a large share of it, and rows of varying length make the 16-bit kernels count.
UNSEEN_SHAPE = dict(hidden_size=384, intermediate_size=1152, num_hidden_layers=6, num_attention_heads=6,
                    num_key_value_heads=3, vocab_size=8000)  # fmt: skip
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "and",
    "then",
    "it",
    "runs",
    "away",
]


def _unseen_run(tmp_path) -> tuple:
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(vocab_size=UNSEEN_SHAPE["vocab_size"])
    torch.manual_seed(0)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = LlamaForCausalLM(LlamaConfig(**UNSEEN_SHAPE, max_position_embeddings=1024, **ids))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rng = random.Random(0)
    with open(tmp_path / "rows.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(60):
            fh.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(60, 300)))}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{name: {tmp_path / 'model'}}}\n"
        f"data: {{datasets: [{{path: {tmp_path / 'rows.jsonl'}, format: text}}], template: text, "
        "max_length: 512}\n"
        "train: {max_steps: 4, batch_size: 4, gradient_checkpointing: false, eval_batches: 1, "
        "eval_every: 100, save_every: 100}\n"
        f"output: {{dir: {tmp_path / 'out'}, samples: 0, plot: false, tensorboard: false}}\n"
    )
    return config, tokenizer


@pytest.mark.slow
def test_the_estimate_predicts_a_real_run_of_an_unseen_shape(tmp_path):
    """`qlorakit train` in its own process: its peak RSS (VmHWM, from summary.json) within 15% of the
    estimate for that config, with this machine's compute dtype and allocator mode."""
    import subprocess

    from qlorakit.tools.estimate.run_shapes import run_shapes
    from qlorakit.train.samples import SAMPLE_BATCH

    config, tokenizer = _unseen_run(tmp_path)
    cfg = load_config(config)
    settings = RunSettings.from_config(cfg).with_shapes(run_shapes(cfg, tokenizer, SAMPLE_BATCH))
    est = settings.estimate(ModelShape.from_config(tmp_path / "model"))
    proc = subprocess.run(
        [sys.executable, "-m", "qlorakit", "train", str(config)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads((tmp_path / "out" / "summary.json").read_text())["peak_rss_mib"] * 2**20
    detail = f"estimate {est.peak / 2**20:.0f} MiB vs measured {measured / 2**20:.0f} MiB: {est.components}"
    assert est.peak == pytest.approx(measured, rel=0.15), detail
    # the run is sensitive to the model: activations alone are more than the 15% tolerance
    assert est.components["activations"] > 0.15 * measured, detail
