"""Bad input that used to end in a traceback or in a silently wrong result: each is now a named error
(exit status 2, nothing written under the output's name) or an explicit note, through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.cli import QUIET_OUTPUT, TINY_LORA, write_jsonl, write_train_yaml
from helpers.tiny import make_tiny_llama, make_tiny_tokenizer, save_tiny_model
from qlorakit.cli import main
from qlorakit.config import DataConfig, DatasetSpec
from qlorakit.core.atomic import is_temporary
from qlorakit.core.errors import DataError
from qlorakit.data import build_datasets

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
ROWS = [
    {"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in ["fox", "dog", "owl"] * 4
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """`model/` (tiny Llama + tokenizer), `data.jsonl` and `train.yaml` (2 steps, checkpoint every step)."""
    root = tmp_path_factory.mktemp("bad")
    write_train_yaml(
        root / "train.yaml",
        model=save_tiny_model(root / "model"),
        data=write_jsonl(root / "data.jsonl", ROWS),
        out=root / "unused",
        lora=TINY_LORA,
        data_settings={"max_length": 32, "val_ratio": 0.25},
        train={"max_steps": 2, "batch_size": 2, "eval_every": 50, "save_every": 1, "num_threads": 1},
        output=QUIET_OUTPUT,
    )
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def copy_model(setup: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(setup / "model", dest)
    return dest


# ---------------------------------------------------------------------------------------------------------
# Tracebacks that are now named errors


@pytest.mark.parametrize("pattern", ["[q_proj", "(q|k", "*_proj"])
def test_target_modules_that_is_not_a_regex_is_a_config_error(setup, tmp_path, capsys, pattern):
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", str(setup / "train.yaml"), f"--output.dir={out}",
                       f"--lora.target_modules={json.dumps(pattern)}")  # fmt: skip
    assert code == 2
    assert f"lora.target_modules: {pattern!r} is not a valid regular expression" in err
    assert not out.exists()


def test_a_bad_regex_in_an_adapter_config_is_named_too(tiny_llama):
    from qlorakit.config import LoRAConfig
    from qlorakit.core.errors import ConfigError
    from qlorakit.lora.inject import inject_lora

    with pytest.raises(ConfigError, match=r"lora.rank_pattern.\[q: '\[q' is not a valid regular expression"):
        inject_lora(tiny_llama, LoRAConfig(rank_pattern={"[q": 2}))


def test_config_json_that_is_not_an_object_is_named_in_generate_and_train(setup, tmp_path, capsys):
    model = copy_model(setup, tmp_path / "model")
    (model / "config.json").write_text("[]")
    code, _, err = run(capsys, "generate", str(model), "--prompt", "hi")
    assert code == 2 and f"{model / 'config.json'} holds a JSON list, not an object" in err
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "train", str(setup / "train.yaml"), f"--model.name={model}", f"--output.dir={out}"
    )
    assert code == 2 and "holds a JSON list" in err
    assert not out.exists()


@pytest.fixture
def wrong_shape_model(setup, tmp_path) -> Path:
    """The tiny model with one weight of the wrong shape (a checkpoint that does not match config.json)."""
    from safetensors.torch import load_file, save_file

    model = copy_model(setup, tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 32)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt", "hi", "--16bit"],
        ["generate", "--prompt", "hi"],
        ["quantize", "--no-perplexity"],
    ],
    ids=["16bit", "4bit", "quantize"],
)
def test_a_tensor_of_the_wrong_shape_is_named(wrong_shape_model, tmp_path, capsys, argv):
    out = tmp_path / "q"
    extra = ["--out", str(out)] if argv[0] == "quantize" else []
    code, _, err = run(capsys, argv[0], str(wrong_shape_model), *argv[1:], *extra)
    assert code == 2
    assert "tensor 'model.layers.0.self_attn.q_proj.weight' has shape [64, 32]" in err
    assert "needs [64, 64]" in err and "model.safetensors" in err
    assert not out.exists()


def test_temperature_nan_is_a_config_error(setup, capsys):
    code, _, err = run(capsys, "generate", str(setup / "model"), "--prompt", "hi", "--temperature", "nan")
    assert code == 2 and "temperature must be a number >= 0" in err


# ---------------------------------------------------------------------------------------------------------
# Silent wrong results that are now refused or said


def test_negative_lora_alpha_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", str(setup / "train.yaml"), f"--output.dir={out}", "--lora.alpha=-5")
    assert code == 2 and "lora.alpha: must be > 0" in err and not out.exists()


def test_an_empty_yaml_file_does_not_silently_run_the_demo(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    code, out, err = run(capsys, "train", str(empty))
    assert code == 2 and "the file is empty" in err and "qlorakit train` alone runs the built-in demo" in err
    assert out == ""


def test_resume_nonexistent_says_no_such_folder(setup, tmp_path, capsys):
    code, _, err = run(capsys, "train", str(setup / "train.yaml"), f"--output.dir={tmp_path / 'o'}",
                       "--train.resume=/nonexistent/step-000002")  # fmt: skip
    assert code == 2 and "/nonexistent/step-000002: no such folder" in err


def test_resume_lists_changed_training_settings_and_refuses_what_cannot_apply(setup, tmp_path, capsys):
    out = tmp_path / "run"
    config = str(setup / "train.yaml")
    assert run(capsys, "train", config, f"--output.dir={out}")[0] == 0
    code, printed, _ = run(capsys, "train", config, f"--output.dir={out}", "--resume", "--train.lr=5e-4",
                           "--train.max_steps=3", "--train.grad_accum=2")  # fmt: skip
    assert code == 0
    assert "resuming from" in printed
    assert "train.lr 0.001 -> 0.0005; train.grad_accum 1 -> 2" in printed  # max_steps: constant schedule
    assert "no longer identical to an uninterrupted run" in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 5e-4  # what the rest used
    code, _, err = run(capsys, "train", config, f"--output.dir={out}", "--resume", "--train.lr=5e-4",
                       "--train.max_steps=4", "--train.grad_accum=2", "--train.weight_decay=0.1")  # fmt: skip
    assert code == 2 and "train.weight_decay: checkpoint 0.0 vs now 0.1" in err
    code, printed, _ = run(capsys, "train", config, f"--output.dir={out}", "--resume", "--train.lr=5e-4",
                           "--train.max_steps=4", "--train.grad_accum=2", "--train.schedule=cosine")  # fmt: skip
    assert code == 0 and "train.schedule 'constant' -> 'cosine'; train.max_steps 3 -> 4" in printed


def test_max_new_tokens_beyond_the_context_is_capped_with_a_note(setup, capsys):
    import re

    from qlorakit.eval.generation import GenerationSettings, generate_ids, render_prompt
    from qlorakit.models.resolve import load_model

    code, _, err = run(capsys, "generate", str(setup / "model"), "--prompt", "hi", "--16bit",
                       "--max-new-tokens", "100000000")  # fmt: skip
    assert code == 0
    note = re.search(r"max_new_tokens 100000000 goes past the model's context of 256 tokens; generating at "
                     r"most (\d+) \(the context minus the (\d+)-token prompt\)", err)  # fmt: skip
    assert note and int(note[1]) + int(note[2]) == 256
    model, tokenizer = load_model(setup / "model")
    prompt = render_prompt("hi", tokenizer)
    new = generate_ids(model, tokenizer, prompt, GenerationSettings(max_new_tokens=10**8))
    # it ran into the cap, or the reply ended on its own before it
    assert len(prompt) + len(new) == 256 or new[-1] == tokenizer.eos_token_id


def test_a_4bit_folder_missing_a_quant_state_key_names_that_key(tmp_path):
    from safetensors.torch import load_file, save_file

    from qlorakit.core.errors import CheckpointError
    from qlorakit.quant.convert import quantize_model, save_quantized
    from qlorakit.quant.loading import load_quantized

    model = make_tiny_llama()
    quantize_model(model)
    folder = save_quantized(model, None, tmp_path / "q4")
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    del tensors[key]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing key 'model.layers.1.mlp.up_proj.weight.quant_state"):
        load_quantized(folder)


def test_prompts_longer_than_max_length_under_truncate_get_the_right_advice(tmp_path):
    rows = [{"instruction": "Reverse the word, and explain every step you take. " * 3, "output": "x"}] * 4
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = [DatasetSpec(path=str(tmp_path / "long.jsonl"))]
    tokenizer = make_tiny_tokenizer()
    with pytest.raises(DataError, match="the prompt alone fills data.max_length=16") as info:
        build_datasets(DataConfig(datasets=spec, max_length=16, val_ratio=0.0), tokenizer, seed=0)
    assert "truncation: truncate" not in str(info.value) and "raise data.max_length" in str(info.value)
    with pytest.raises(DataError, match="data.truncation is drop; raise data.max_length or set"):
        build_datasets(
            DataConfig(datasets=spec, max_length=16, truncation="drop", val_ratio=0.0), tokenizer, seed=0
        )


def test_skipped_rows_are_listed_by_file_and_line(tmp_path):
    lines = [json.dumps(r) for r in ROWS[:4]]
    lines[1:1] = ['{"instruction": "no output"}', "not json", "[1, 2]"]
    lines += ['{"nothing": 1}'] * 5
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(datasets=[DatasetSpec(path=str(path))], skip_invalid=True, val_ratio=0.0)
    summary = build_datasets(cfg, make_tiny_tokenizer(), seed=0).stats.summary()
    assert f"skipped 8 invalid row(s) of {path}: {path}:2 (" in summary
    assert f"; {path}:3 (" in summary and f"; {path}:4 (" in summary and "; and 3 more" in summary


def test_estimate_validates_the_budget_before_printing_anything(setup, capsys):
    code, out, err = run(capsys, "estimate", str(setup / "model"), "--budget", "8 potatoes")
    assert code == 2 and "cannot read memory size '8 potatoes'" in err
    assert out == ""


def test_quantize_after_a_sigkill_removes_the_temporary_folder_it_left(setup, tmp_path, capsys):
    """A quantize killed while saving leaves `.<out>.qlorakit-<pid>-*.tmp`; the next run cleans it up."""
    out = tmp_path / "q4"
    code = (
        "import os, signal, sys; from pathlib import Path; from qlorakit.core.atomic import make_temp_dir\n"
        "tmp = make_temp_dir(Path(sys.argv[1]).parent, Path(sys.argv[1]).name)\n"
        "(tmp / 'model.safetensors').write_bytes(b'half a model')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(out)], env=ENV).returncode == -signal.SIGKILL
    (stale,) = [p for p in tmp_path.iterdir() if is_temporary(p.name)]
    assert run(capsys, "quantize", str(setup / "model"), "--out", str(out), "--no-perplexity")[0] == 0
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q4"]
