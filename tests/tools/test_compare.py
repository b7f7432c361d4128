"""`qlorakit compare`: the report builder on synthetic run folders, and the real command end to end."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import yaml

from helpers.compare import assert_png, synthetic_run, tiny_compare_setup
from helpers.tiny import make_tiny_llama
from qlorakit.cli import main
from qlorakit.core.errors import CheckpointError
from qlorakit.core.outputs import write_marker
from qlorakit.tools.compare import (
    PLOTS,
    REPORT,
    build_report,
    conclusion,
    estimated_peak,
    median_step_time,
    read_run,
    setting_differences,
    write_report,
)


def test_median_step_time_uses_the_logged_intervals():
    records = [{"step": s, "split": "train", "elapsed_s": t} for s, t in ((2, 5.0), (4, 6.0), (6, 7.2))]
    records.append({"step": 6, "split": "val", "elapsed_s": 99.0})  # validation rows are ignored
    # intervals: 5.0/2 (first: warm-up, dropped), 1.0/2, 1.2/2 -> median 0.55
    assert median_step_time(records) == pytest.approx(0.55)
    assert median_step_time(records[:1]) == pytest.approx(2.5)
    assert median_step_time([]) is None


def test_report_builder_on_synthetic_runs(tmp_path):
    lora_dir = synthetic_run(
        tmp_path / "lora16",
        peak=1000.0,
        elapsed=[2.0, 2.5, 3.0, 3.5],
        val=2.5,
        train_loss=2.6,
        quantization="16-bit",
        adapter_rows=8,
    )
    qlora_dir = synthetic_run(
        tmp_path / "qlora",
        peak=600.0,
        elapsed=[3.0, 3.75, 4.5, 5.25],
        val=2.52,
        train_loss=2.61,
        quantization="nf4 4-bit",
        adapter_rows=8,
    )
    report_path = write_report(
        tmp_path / "out", lora_dir, qlora_dir, commands={"QLoRA": "qlorakit train x"}, auto_dtype="float32"
    )
    assert report_path == tmp_path / "out" / REPORT
    text = report_path.read_text()
    # numbers computed from the synthetic folders: memory 1 - 600/1000, median steps 0.75 / 0.5
    expected = (
        "QLoRA used 40% less peak memory (600 vs 1,000 MiB) than 16-bit LoRA at 1.50× the step time; "
        "final validation loss differs by +0.0200 (2.5200 vs 2.5000)."
    )
    assert expected in text
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
        for line in text.splitlines()
        if line.startswith("| ")
    }
    assert rows["Peak memory (RSS, whole process)"] == ["1,000 MiB", "600 MiB"]
    assert rows["Step time (median)"] == ["0.500 s", "0.750 s"]
    assert rows["Step time (mean)"] == [f"{3.5 / 4:.3f} s", f"{5.25 / 4:.3f} s"]
    assert rows["Throughput"] == [f"{400 / 3.5:,.1f} tokens/s", f"{400 / 5.25:,.1f} tokens/s"]
    assert rows["Final train loss"] == ["2.6000", "2.6100"]
    assert rows["Validation loss before → after"] == ["3.5000 → 2.5000", "3.5000 → 2.5200"]
    assert rows["Held-out exact match before → after"] == ["0/2 → 1/2", "0/2 → 1/2"]
    size = (lora_dir / "adapter_model.safetensors").stat().st_size
    assert rows["Adapter size on disk"] == [f"{size / 1024:.2f} KiB"] * 2
    assert rows["Base weights"] == ["16-bit", "nf4 4-bit"]
    assert rows["Compute dtype"] == ["auto (float32)", "auto (float32)"]
    assert rows["Estimated peak (qlorakit estimate, at max_length)"] == ["n/a", "n/a"]  # no full config
    assert "command: `qlorakit train x`" in text and "Warning" not in text
    for name in PLOTS.values():
        assert f"]({name})" in text
        assert_png(tmp_path / "out" / name)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([REPORT, *PLOTS.values()])


def test_estimated_peak_uses_the_run_settings(tmp_path):
    from qlorakit.config import config_to_dict, load_config
    from qlorakit.models.shape import ModelShape
    from qlorakit.tools.estimate.memory import estimate_memory

    make_tiny_llama(hidden_size=128, intermediate_size=256, vocab_size=1000).save_pretrained(tmp_path / "m")
    settings = ["--train.batch_size=3", "--data.max_length=96", "--lora.r=4", "--lora.dropout=0.1"]
    settings += [
        "--quant.compute_dtype=auto",
        "--train.optim=paged_adamw_8bit",
        f"--model.name={tmp_path / 'm'}",
    ]
    for quant, method in ((False, "lora"), (True, "qlora")):
        run = read_run(
            synthetic_run(
                tmp_path / method, peak=1.0, elapsed=[1.0], val=1.0, train_loss=1.0, quantization=method
            ),
            method,
        )
        cfg = config_to_dict(load_config(None, [*settings, f"--quant.enabled={quant}"]))
        run = dataclasses.replace(run, config=cfg)
        want = estimate_memory(
            ModelShape.from_config(tmp_path / "m"),
            method=method,
            batch=3,
            seq=96,
            r=4,
            compute_dtype="bfloat16",
            optimizer="adamw_8bit",
            lora_dropout=0.1,
        )
        assert estimated_peak(run, "bfloat16") == want.peak
        assert estimated_peak(run, None) is None  # "auto" without knowing what it resolved to
        cfg["lora"]["target_modules"] = "no_such_layer"
        assert (
            estimated_peak(type(run)(run.label, run.folder, run.summary, run.records, 1, cfg), "float32")
            is None
        )


def test_report_warns_when_the_runs_differ_in_more_than_quantization(tmp_path):
    lora = read_run(
        synthetic_run(
            tmp_path / "a",
            peak=500.0,
            elapsed=[1.0, 2.0],
            val=2.0,
            train_loss=2.0,
            quantization="16-bit",
            seed=1,
        ),
        "16-bit LoRA",
    )
    qlora = read_run(
        synthetic_run(
            tmp_path / "b",
            peak=550.0,
            elapsed=[1.0, 3.0],
            val=1.9,
            train_loss=2.0,
            quantization="nf4 4-bit",
            seed=2,
        ),
        "QLoRA",
    )
    assert setting_differences(lora, qlora) == ["train.seed: 1 vs 2"]
    text = build_report(lora, qlora)
    assert "Warning" in text and "train.seed: 1 vs 2" in text
    # more memory and a lower loss are reported as such
    assert conclusion(lora, qlora) == (
        "QLoRA used 10% more peak memory (550 vs 500 MiB) than 16-bit LoRA at 2.00× the step time; "
        "final validation loss differs by -0.1000 (1.9000 vs 2.0000)."
    )


def test_unfinished_run_folder_is_named(tmp_path):
    folder = synthetic_run(
        tmp_path / "run", peak=1.0, elapsed=[1.0], val=1.0, train_loss=1.0, quantization="x"
    )
    (folder / "summary.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(folder / "summary.json"))):
        read_run(folder, "QLoRA")
    with pytest.raises(CheckpointError, match="did not finish"):
        write_report(tmp_path / "out", folder, folder)
    assert not (tmp_path / "out" / REPORT).exists()


def test_cli_rejects_clashing_overrides_and_existing_runs(tmp_path, capsys):
    config = tiny_compare_setup(tmp_path)
    assert main(["compare", str(config), "--out", str(tmp_path / "c"), "--output.dir=x"]) == 2
    assert "--output.dir=x" in capsys.readouterr().err
    assert main(["compare", str(config), "--train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err
    (tmp_path / "c" / "lora16").mkdir(parents=True)
    (tmp_path / "c" / "lora16" / "metrics.jsonl").write_text("")
    assert main(["compare", str(config), "--out", str(tmp_path / "c")]) == 2
    assert "did not write (lora16)" in capsys.readouterr().err  # not a compare folder: never written into
    write_marker(tmp_path / "c", "compare", ["lora16"])  # as an earlier compare leaves it
    assert main(["compare", str(config), "--out", str(tmp_path / "c")]) == 2
    assert "--report-only" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_end_to_end_on_a_tiny_model(tmp_path, capsys):
    config = tiny_compare_setup(tmp_path)
    out = tmp_path / "cmp"
    threads = torch.get_num_threads()
    try:
        assert main(["compare", str(config), "--out", str(out), "--train.max_steps=4"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    for name, enabled in (("lora16", False), ("qlora", True)):
        resolved = yaml.safe_load((out / name / "config.yaml").read_text())
        assert resolved["quant"]["enabled"] is enabled
        assert resolved["train"]["max_steps"] == 4 and resolved["train"]["seed"] == 3
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["steps"] == 4 and summary["peak_rss_mib"] > 100
    text = (out / REPORT).read_text()
    lora, qlora = read_run(out / "lora16", "16-bit LoRA"), read_run(out / "qlora", "QLoRA")
    sentence = conclusion(lora, qlora)
    assert re.fullmatch(
        r"QLoRA used \d+% (less|more) peak memory \([\d,]+ vs [\d,]+ MiB\) than 16-bit LoRA at [\d.]+× the "
        r"step time; final validation loss differs by [-+][\d.]+ \([\d.]+ vs [\d.]+\)\.",
        sentence,
    )
    assert sentence in text and sentence in printed
    assert "nf4 4-bit" in text and "16-bit (no quantization)" in text
    from qlorakit.models.load import resolve_compute_dtype

    resolved = str(resolve_compute_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    assert f"| Compute dtype | auto ({resolved}) | auto ({resolved}) |" in text
    for run in (lora, qlora):
        assert f"{estimated_peak(run, resolved) / 2**20:,.0f} MiB" in text
    assert f"{lora.peak_rss_mib:,.0f} MiB" in text and f"{qlora.peak_rss_mib:,.0f} MiB" in text
    assert "--quant.enabled=false" in text and "--quant.enabled=true" in text
    assert "Warning" not in text  # the two runs differ only in quantization and folder
    # both adapters have the same tensors, so the same size; the val curves have one point per 2 steps
    assert lora.adapter_bytes == qlora.adapter_bytes > 0
    assert [r["step"] for r in qlora.records if r["split"] == "val"] == [2, 4]
    for name in PLOTS.values():
        assert_png(out / name)
    # the report can be rebuilt from the finished runs without training again
    (out / REPORT).unlink()
    assert main(["compare", str(config), "--out", str(out), "--train.max_steps=4", "--report-only"]) == 0
    assert (out / REPORT).read_text().split("## Runs")[0] == text.split("## Runs")[0]
