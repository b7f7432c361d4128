"""The typed run summary: summary.json written and read back, the parameter counts and the saved size,
and summaries written before those fields existed."""

from __future__ import annotations

import json

import pytest

from qlorakit.core.errors import CheckpointError
from qlorakit.train.report import SUMMARY, HeldOutGeneration, RunSummary, read_summary


def _summary(**changes) -> RunSummary:
    values = dict(
        output_dir="runs/x", base_model="tiny", quantization="16-bit (no quantization)", lora_r=4,
        lora_alpha=8.0, trainable="trainable params: 10", data_summary="data", steps=3, total_steps=3,
        stop_reason="max_steps", epochs=0.5, world_size=1, final_train_loss=2.0, val_loss_before=3.0,
        val_loss_after=2.5, best_val_loss=2.5, best_step=3, samples=1, exact_before=0, exact_after=1,
        generations=(HeldOutGeneration("p", "r", "b", "r"),), wall_time_s=9.0, train_time_s=3.0,
        tokens_per_s=100.0, peak_rss_mib=512.0,
    )  # fmt: skip
    return RunSummary(**{**values, **changes})


def test_counts_and_saved_size_round_trip_through_summary_json(tmp_path):
    summary = _summary(trainable_params=250, total_params=100_000, output_bytes=4096, loss_curve="c.png")
    summary.write(tmp_path)
    data = json.loads((tmp_path / SUMMARY).read_text())
    assert list(data)[-3:] == ["trainable_params", "total_params", "output_bytes"]  # field order
    back = read_summary(tmp_path)
    assert back == summary
    assert back.trainable_percent == pytest.approx(0.25)


def test_a_summary_from_before_the_counts_reads_with_none(tmp_path):
    data = _summary().to_json()
    for key in ("loss_curve", "trainable_params", "total_params", "output_bytes"):
        del data[key]
    (tmp_path / SUMMARY).write_text(json.dumps(data))
    back = read_summary(tmp_path)
    assert back.trainable_params is None and back.output_bytes is None and back.trainable_percent is None
    del data["peak_rss_mib"]  # a field every summary has is still required, by name
    (tmp_path / SUMMARY).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="has no peak_rss_mib"):
        read_summary(tmp_path)
