"""End to end: the real `qlorakit train` on a tiny 2-layer Llama folder + tiny Alpaca file (4-bit base, LoRA,
PEFT adapter), its output folder, falling loss, resume, and the errors users hit first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.cli import adapter_tensors, cli_env, write_tiny_setup
from qlorakit.cli import main
from qlorakit.config import load_config
from qlorakit.train import checkpoint as ckpt
from qlorakit.train.metrics import read_records

pytestmark = pytest.mark.dtype_sensitive

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real training run (12 steps), shared by the assertions below."""
    root = tmp_path_factory.mktemp("cli")
    config = write_tiny_setup(root)
    threads = torch.get_num_threads()
    try:
        code = main(["train", str(config), "--train.lr=1e-2", "--output.samples=2"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return config, root, root / "out"


def test_output_folder(trained):
    _, _, out = trained
    names = {p.name for p in out.iterdir()}
    expected = {
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.yaml",
        "metrics.jsonl",
        "metrics.csv",
    }
    expected |= {"README.md", "summary.json", "loss_curve.png", "tokenizer.json", "tokenizer_config.json"}
    assert expected <= names
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["lr"] == 1e-2 and resolved["quant"]["enabled"] is True
    readme = (out / "README.md").read_text()
    for needle in ("Base model", "Final train loss", "peak RSS", "tokens/s", "Wall time", "Exact match"):
        assert needle in readme
    steps = [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")]
    assert steps[-1] == 12
    ckpt.verify_checkpoint(out / "checkpoints" / ckpt.checkpoint_name(12))


def test_loss_falls(trained):
    _, _, out = trained
    records = read_records(out / "metrics.jsonl")
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train) == 12
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert summary["steps"] == 12 and summary["samples"] == 2 and len(summary["generations"]) == 2
    assert summary["tokens_per_s"] > 0 and summary["peak_rss_mib"] > 0


def test_summary_counts_the_trained_parameters_and_the_saved_bytes(trained):
    """The counts `qlorakit compare` reports, against the saved adapter and the base's own file."""
    from safetensors.torch import load_file

    _, root, out = trained
    summary = json.loads((out / "summary.json").read_text())
    trained_count = sum(t.numel() for t in adapter_tensors(out).values())
    base_count = sum(t.numel() for t in load_file(root / "model" / "model.safetensors").values())
    assert summary["trainable_params"] == trained_count > 0
    assert summary["total_params"] == base_count + trained_count  # 4-bit weights count 2 per byte
    assert summary["output_bytes"] == (out / "adapter_model.safetensors").stat().st_size


def test_adapter_loads_in_peft_on_the_same_base(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, root, out = trained
    base = AutoModelForCausalLM.from_pretrained(root / "model")
    model = PeftModel.from_pretrained(base, out)
    saved = adapter_tensors(out)
    state = model.state_dict()
    assert saved
    for key, value in saved.items():
        live = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        assert torch.equal(state[live], value), key
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained, not the zero init
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        root / "model"
    )


def test_resume_continues_and_fresh_run_refuses_existing_checkpoints(trained, capsys):
    config, _, out = trained
    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        assert main(["train", str(config), "--train.lr=1e-2"]) == 2
        assert "--resume" in capsys.readouterr().err
        assert main(["train", str(config), "--train.lr=1e-2", "--train.max_steps=14", "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "resuming from" in capsys.readouterr().out
    steps = [r["step"] for r in read_records(out / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, 15))


def test_changed_settings_refuse_to_resume(trained, capsys):
    config, _, out = trained
    assert main(["train", str(config), "--lora.r=4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "run settings changed" in err and "lora" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train.nope=1"], "train.nope: unknown key"),
        (["--train.optim=paged_adamw_8bit"], "needs a CUDA GPU"),
        (["--data.datasets=[{path: /nonexistent/rows.json}]"], "/nonexistent/rows.json"),
    ],
)
def test_bad_input_fails_before_loading_the_model(tmp_path, capsys, args, message):
    if "paged" in args[0] and torch.cuda.is_available():
        pytest.skip("bitsandbytes optimizers run on CUDA")
    code = main(["train", f"--output.dir={tmp_path / 'o'}", "--model.name=/nonexistent-model", *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_cli_argument_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--bogus"])
    assert info.value.code == 2
    assert "--bogus" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["qlora-smollm2.yaml", "lora16-smollm2.yaml", "alpaca-own-file.yaml"])
def test_example_configs_are_valid(name, monkeypatch):
    from qlorakit.data import check_datasets

    monkeypatch.chdir(REPO)  # the own-file example points at configs/example-alpaca.json
    cfg = load_config(REPO / "configs" / name)
    check_datasets(cfg.data)
    if name == "qlora-smollm2.yaml":  # the documented demo spells out exactly what bare `qlorakit` runs
        default = load_config(None)
        assert (cfg.model, cfg.quant, cfg.lora, cfg.data, cfg.train) == (
            default.model,
            default.quant,
            default.lora,
            default.data,
            default.train,
        )
        assert cfg.output.dir == default.output.dir
    if name == "lora16-smollm2.yaml":
        assert cfg.quant.enabled is False


DEMO_STEPS = 20  # a third of the demo's 60: enough for the built-in tasks to be learnt visibly


@pytest.mark.slow
def test_default_demo_learns_what_it_promises(tmp_path):
    """The real built-in demo (smollm2-135m, NF4 + double quant, built-in data), shortened to DEMO_STEPS:
    validation loss must fall and held-out exact match must rise on the 24 examples the summary reports,
    and every file the summary lists (the loss curve included) must exist."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlorakit",
            "train",
            f"--train.max_steps={DEMO_STEPS}",
            f"--train.eval_every={DEMO_STEPS}",
            f"--output.dir={out}",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_model"] == "smollm2-135m" and summary["steps"] == DEMO_STEPS
    assert summary["samples"] == 24
    assert summary["val_loss_after"] < summary["val_loss_before"], summary
    assert summary["exact_after"] > summary["exact_before"], (summary["exact_before"], summary["exact_after"])
    shown = f"{summary['exact_after']}/24 ({100 * summary['exact_after'] / 24:.1f}%)"
    assert shown in proc.stdout and shown in (out / "README.md").read_text()
    assert (
        summary["loss_curve"] == "loss_curve.png" and (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    )
    assert "`loss_curve.png`" in (out / "README.md").read_text()
    assert (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    assert os.path.getsize(out / "adapter_model.safetensors") > 1_000_000
