"""`qlorakit compare --methods`: the table of compare names, bad lists refused before anything trains, the
report of several methods on synthetic runs with chosen numbers, and lora,qlora,dora trained for real."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers.compare import assert_png, synthetic_run, tiny_compare_setup
from qlorakit.cli import TOP_LEVEL_KEYS, is_override, main
from qlorakit.config import load_config
from qlorakit.core.errors import ConfigError
from qlorakit.core.fill import parse_override
from qlorakit.tools.compare import (
    PLOTS,
    REPORT,
    build_report,
    conclusions,
    quantization_drift,
    read_run,
    write_report,
)
from qlorakit.tools.compare_methods import COMPARE_METHODS, available_names, parse_methods
from qlorakit.tools.compare_plots import quality_axis

# The settings each compare name stands for (the spec of `--methods`).
EXPECTED_SETTINGS = {
    "full": {"method": "full", "quant.enabled": False},
    "lora": {"method": "lora", "quant.enabled": False},
    "qlora": {"method": "lora", "quant.enabled": True},
    "dora": {"method": "lora", "quant.enabled": True, "lora.use_dora": True},
    "ia3": {"method": "ia3"},
    "prompt": {"method": "prompt"},
    "prefix": {"method": "prefix"},
    "adapter": {"method": "adapter"},
}
MATPLOTLIB_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c")  # C0, C1, C2: the first three runs


def _drawn_in(pixels, colour: str) -> int:
    """How many pixels of an RGB(A) image in [0, 1] have `colour` (within antialiasing noise)."""
    rgb = torch.tensor([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    image = torch.from_numpy(pixels[..., :3].copy()).float()
    return int(((image - rgb).abs().max(dim=-1).values < 0.03).sum())


def _table(text: str, first: str) -> dict[str, list[str]]:
    """The Markdown table of `text` whose header starts with `first`, as {first cell: other cells}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_table_covers_every_compare_name_with_its_settings():
    assert {name: dict(row.settings) for name, row in COMPARE_METHODS.items()} == EXPECTED_SETTINGS
    assert len({row.folder for row in COMPARE_METHODS.values()}) == len(COMPARE_METHODS)
    assert len({row.label for row in COMPARE_METHODS.values()}) == len(COMPARE_METHODS)
    for row in COMPARE_METHODS.values():
        # the train command line takes each setting as a config override and reads back the same value
        for text, (key, value) in zip(row.overrides(), row.settings, strict=True):
            assert is_override(text) or text.startswith(tuple(f"--{k}=" for k in TOP_LEVEL_KEYS))
            assert parse_override(text) == (key.split("."), value)
    # the methods this qlorakit has resolve to configs that say what the name means
    assert {"lora", "qlora", "dora"} <= set(available_names())
    for name in available_names():
        cfg = load_config(None, COMPARE_METHODS[name].overrides())
        for key, value in EXPECTED_SETTINGS[name].items():
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value, (name, key)


def test_parse_methods_keeps_the_order_and_defaults_to_lora_and_qlora():
    assert [m.name for m in parse_methods(None)] == ["lora", "qlora"]
    assert [m.name for m in parse_methods(" DoRA, lora ,qlora")] == ["dora", "lora", "qlora"]


def test_a_name_whose_method_is_missing_is_a_named_error_listing_the_available_ones():
    # a qlorakit whose config and METHODS know only LoRA
    with pytest.raises(ConfigError) as err:
        parse_methods("lora,ia3,full", known={"lora"})
    text = str(err.value)
    assert text.startswith("--methods: 2 problem(s)")
    assert "'ia3' needs the fine-tuning method 'ia3', which this qlorakit does not have" in text
    assert "'full' needs the fine-tuning method 'full'" in text
    assert "available: lora, qlora, dora" in text
    # this qlorakit: every name mapped to a method it does not have yet is refused the same way
    for name in [n for n in COMPARE_METHODS if n not in available_names()]:
        with pytest.raises(ConfigError, match=f"'{name}' needs the fine-tuning method"):
            parse_methods(f"qlora,{name}")


@pytest.mark.parametrize(
    ("methods", "needle"),
    [
        ("", "the list is empty"),
        (" , ", "an empty name"),
        ("lora,,qlora", "an empty name in 'lora,,qlora'"),
        ("lora,qlora2", "unknown name 'qlora2'; compare names are full, lora, qlora, dora"),
        ("lora,qlora,LoRA", "'lora' is listed twice"),
    ],
)
def test_bad_method_lists_are_named_errors_before_anything_trains(tmp_path, capsys, methods, needle):
    config = tiny_compare_setup(tmp_path)
    out = tmp_path / "cmp"
    assert main(["compare", str(config), "--out", str(out), "--methods", methods]) == 2
    err = capsys.readouterr().err
    assert "--methods" in err and needle in err
    assert not out.exists()  # refused before the output folder was claimed or a run started


def test_steps_and_method_settings_given_twice_are_refused(tmp_path, capsys):
    config = tiny_compare_setup(tmp_path)
    out = tmp_path / "cmp"
    base = ["compare", str(config), "--out", str(out)]
    assert main([*base, "--max-steps", "0"]) == 2
    assert "--max-steps: must be a positive number" in capsys.readouterr().err
    assert main([*base, "--max-steps", "3", "--train.max_steps=5"]) == 2
    assert "--train.max_steps=5 both set the steps" in capsys.readouterr().err
    # dora sets lora.use_dora itself: the user's value would be silently replaced
    assert main([*base, "--methods", "lora,dora", "--lora.use_dora=false"]) == 2
    err = capsys.readouterr().err
    assert "--lora.use_dora=false" in err and "lora.use_dora" in err and "--methods" in err
    assert not out.exists()


def _three_runs(root, dora_seed: int = 7):
    """16-bit LoRA, QLoRA and DoRA run folders with chosen numbers (see the assertions)."""
    gens = [
        {"prompt": "p", "reference": "olleh", "before": "hello", "after": "olleh"},
        {"prompt": "q", "reference": "xof", "before": "", "after": "xof fox"},
    ]
    common = {"generations": gens, "samples": 2, "total_params": 100_000}
    lora = synthetic_run(
        root / "lora16", peak=1000.0, elapsed=[2.0, 2.5, 3.0, 3.5], val=2.5, train_loss=2.6,
        quantization="16-bit", config={"method": "lora", "lora": {"use_dora": False}},
        trainable_params=1000, output_bytes=4096, **common,
    )  # fmt: skip
    qlora = synthetic_run(
        root / "qlora", peak=600.0, elapsed=[3.0, 3.75, 4.5, 5.25], val=2.52, train_loss=2.61,
        quantization="nf4 4-bit", config={"method": "lora", "lora": {"use_dora": False}},
        trainable_params=1000, output_bytes=4096, val_loss_before=3.6, **common,
    )  # fmt: skip
    dora = synthetic_run(
        root / "dora", peak=650.0, elapsed=[4.0, 5.0, 6.0, 7.0], val=2.4, train_loss=2.5,
        quantization="nf4 4-bit", seed=dora_seed, config={"method": "lora", "lora": {"use_dora": True}},
        trainable_params=1100, output_bytes=4500, val_loss_before=3.6, **common,
    )  # fmt: skip
    return lora, qlora, dora


def test_report_of_three_methods_on_synthetic_runs(tmp_path):
    folders = _three_runs(tmp_path)
    methods = parse_methods("lora,qlora,dora")
    report = write_report(tmp_path / "out", *folders, methods=methods, auto_dtype="float32")
    text = report.read_text()
    assert text.startswith("# 16-bit LoRA vs QLoRA vs DoRA (4-bit base)\n")
    table = _table(text, "Method")
    header = table.pop("Method")
    assert list(table) == ["---", "16-bit LoRA", "QLoRA", "DoRA (4-bit base)"]  # a row per method
    rows = {label: dict(zip(header, cells, strict=True)) for label, cells in table.items() if label != "---"}
    assert [rows[k]["Trainable params"] for k in rows] == ["1,000", "1,000", "1,100"]
    assert [rows[k]["Trainable %"] for k in rows] == ["1.0000%", "1.0000%", "1.1000%"]
    assert [rows[k]["Saved weights"] for k in rows] == ["4.00 KiB", "4.00 KiB", "4.39 KiB"]
    assert [rows[k]["Peak memory (VmHWM)"] for k in rows] == ["1,000 MiB", "600 MiB", "650 MiB"]
    assert [rows[k]["s / step (median)"] for k in rows] == ["0.500", "0.750", "1.000"]
    assert [rows[k]["Tokens / s"] for k in rows] == [f"{400 / t:,.1f}" for t in (3.5, 5.25, 7.0)]
    assert rows["DoRA (4-bit base)"]["Val loss before → after"] == "3.6000 → 2.4000"
    assert rows["QLoRA"]["Exact match before → after"] == "0/2 → 1/2"
    # ROUGE-L F1 by hand: before 0 and 0; after 1 ("olleh") and 2/3 ("xof" in "xof fox": P 1/2, R 1)
    assert {r["ROUGE-L before → after"] for r in rows.values()} == {"0.000 → 0.833"}
    # drift: 4-bit base 3.6 vs 16-bit base 3.5 before training; QLoRA's twin is 16-bit LoRA (2.52 - 2.5)
    assert rows["16-bit LoRA"]["Quantization drift (val loss)"] == "– (16-bit base)"
    assert (
        rows["QLoRA"]["Quantization drift (val loss)"] == "+0.1000 (base), +0.0200 trained (vs 16-bit LoRA)"
    )
    assert rows["DoRA (4-bit base)"]["Quantization drift (val loss)"] == "+0.1000 (base)"  # no 16-bit DoRA
    details = _table(text, "Metric")
    assert details["Method"] == ["LoRA r=8 alpha=16", "LoRA r=8 alpha=16", "LoRA r=8 alpha=16, DoRA"]
    assert details["Adapter size on disk"] == ["4.00 KiB", "4.00 KiB", "4.39 KiB"]
    assert (
        "**DoRA (4-bit base) used 35% less peak memory (650 vs 1,000 MiB) than 16-bit LoRA at 2.00× the "
        "step time; final validation loss differs by -0.1000 (2.4000 vs 2.5000).**"
    ) in text
    assert "**QLoRA used 40% less peak memory" in text
    assert "Warning" not in text  # the runs differ only in the settings their methods make
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([REPORT, *PLOTS.values()])
    for key in ("loss", "tradeoff"):
        pixels = assert_png(tmp_path / "out" / PLOTS[key])
        assert f"]({PLOTS[key]})" in text
        for colour in MATPLOTLIB_COLOURS:  # every method is drawn, in its own colour
            assert _drawn_in(pixels, colour) > 20, (key, colour)


def test_runs_that_differ_beyond_their_method_settings_are_flagged(tmp_path):
    lora, qlora, dora = (read_run(f, f.name) for f in _three_runs(tmp_path, dora_seed=8))
    text = build_report(
        lora, qlora, dora, expected={"output.dir", "method", "quant.enabled", "lora.use_dora"}
    )
    assert "Warning" in text and "- dora: train.seed: 7 vs 8" in text
    assert "qlora: train" not in text
    # the seed differs, so DoRA's twin search is unaffected (it has none) and QLoRA keeps its twin
    assert quantization_drift(qlora, [lora, qlora, dora]).twin == "lora16"
    assert quantization_drift(lora, [lora, qlora, dora]) is None
    assert conclusions([lora]) == []


def test_memory_vs_quality_falls_back_to_the_train_loss_without_validation(tmp_path):
    runs = [
        read_run(
            synthetic_run(
                tmp_path / name, peak=peak, elapsed=[1.0], val=1.0, train_loss=loss,
                quantization="16-bit", val_loss_after=None,
            ),
            name,
        )
        for name, peak, loss in (("a", 500.0, 2.0), ("b", 400.0, 2.2))
    ]  # fmt: skip
    assert quality_axis(runs) == ("final train loss (lower is better)", [2.0, 2.2])
    assert quality_axis(runs[:1] + [runs[1]])[1] == [2.0, 2.2]
    out = write_report(tmp_path / "out", *(r.folder for r in runs), auto_dtype="float32")
    assert_png(out.parent / PLOTS["tradeoff"])


@pytest.mark.slow
def test_compare_lora_qlora_dora_end_to_end_on_a_tiny_model(tmp_path, capsys):
    config = tiny_compare_setup(tmp_path)
    out = tmp_path / "cmp"
    argv = ["compare", str(config), "--out", str(out), "--methods", "lora,qlora,dora", "--max-steps", "3"]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    model_params = sum(
        t.numel() for t in load_file(tmp_path / "model" / "model.safetensors").values()
    )  # the tiny base, read from its own file
    for folder, enabled, dora in (("lora16", False, False), ("qlora", True, False), ("dora", True, True)):
        resolved = yaml.safe_load((out / folder / "config.yaml").read_text())
        assert resolved["method"] == "lora" and resolved["quant"]["enabled"] is enabled
        assert resolved["lora"]["use_dora"] is dora
        assert resolved["train"]["max_steps"] == 3 and resolved["train"]["seed"] == 3
        summary = json.loads((out / folder / "summary.json").read_text())
        adapter = load_file(out / folder / "adapter_model.safetensors")
        # the counts the report shows, against the saved adapter and the base's own file
        assert summary["steps"] == 3
        assert summary["trainable_params"] == sum(t.numel() for t in adapter.values())
        assert summary["total_params"] == model_params + summary["trainable_params"]
        assert summary["output_bytes"] == (out / folder / "adapter_model.safetensors").stat().st_size
        assert any(k.endswith("lora_magnitude_vector") for k in adapter) is dora
    text = (out / REPORT).read_text()
    table = _table(text, "Method")
    assert [k for k in table if k not in ("Method", "---")] == ["16-bit LoRA", "QLoRA", "DoRA (4-bit base)"]
    runs = [read_run(out / f, label) for f, label in (("lora16", "16-bit LoRA"), ("qlora", "QLoRA"))]
    runs.append(read_run(out / "dora", "DoRA (4-bit base)"))
    header = _table(text, "Method")["Method"]
    for run in runs:
        row = dict(zip(header, table[run.label], strict=True))
        share = 100 * run.summary.trainable_params / run.summary.total_params
        assert row["Trainable params"] == f"{run.summary.trainable_params:,d}"
        assert row["Trainable %"] == f"{share:.4f}%"
        assert row["Peak memory (VmHWM)"] == f"{run.peak_rss_mib:,.0f} MiB"
    drift = quantization_drift(runs[1], runs)
    assert drift.base == pytest.approx(runs[1].summary.val_loss_before - runs[0].summary.val_loss_before)
    assert drift.twin == "16-bit LoRA" and quantization_drift(runs[2], runs).twin is None
    sentences = conclusions(runs)
    assert len(sentences) == 2 and all(s in text and s in printed for s in sentences)
    assert re.match(r"DoRA \(4-bit base\) used \d+% (less|more) peak memory", sentences[1])
    assert "--lora.use_dora=true" in text and "Warning" not in text
    for key in ("loss", "tradeoff"):
        pixels = assert_png(out / PLOTS[key])
        for colour in MATPLOTLIB_COLOURS:
            assert _drawn_in(pixels, colour) > 20, (key, colour)
    # the report is rebuilt from the finished runs without training again
    (out / REPORT).unlink()
    assert main([*argv, "--report-only"]) == 0
    assert (out / REPORT).read_text().split("## Runs")[0] == text.split("## Runs")[0]
