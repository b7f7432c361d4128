from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from helpers.tinytrain import collate, make_examples, run_tiny, tiny_lora_model, trainable_state
from qlorakit.config import TrainConfig
from qlorakit.loss import token_loss_sum
from qlorakit.train import checkpoint as ckpt
from qlorakit.train.loop import TrainingDivergedError, count_label_tokens
from qlorakit.train.metrics import read_records

pytestmark = pytest.mark.dtype_sensitive


def test_token_loss_sum_matches_transformers_mean_loss():
    model = tiny_lora_model(dropout=0.0)
    batch = collate(make_examples(3, seed=5))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    mine = token_loss_sum(out.logits, batch["labels"]) / count_label_tokens(batch)
    torch.testing.assert_close(mine, out.loss, rtol=1e-5, atol=1e-6)


def test_loss_falls_and_metrics_are_written(tmp_path):
    cfg = TrainConfig(
        max_steps=20, batch_size=4, lr=1e-2, eval_every=10, save_every=10, keep_last=1, seed=1, warmup_steps=0
    )
    result, _, _ = run_tiny(tmp_path, cfg)
    records = read_records(tmp_path / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert [r["step"] for r in val] == [10, 20]
    assert sum(r["loss"] for r in train[-5:]) / 5 < 0.7 * sum(r["loss"] for r in train[:5]) / 5
    assert val[-1]["loss"] < val[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] >= 0 for r in train)
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,split,epoch,loss,lr")
    assert len(csv_lines) == 1 + len(records)
    assert result.stop_reason == "max_steps" and result.state.step == 20
    # keep_last=1 plus the best checkpoint (best == last here, the loss keeps falling)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [20]


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path):
    data = make_examples(24, seed=7)
    common = dict(max_steps=4, lr=1e-2, eval_every=100, save_every=100, seed=3, max_grad_norm=1.0)
    _, big, _ = run_tiny(
        tmp_path / "a",
        TrainConfig(batch_size=4, grad_accum=1, **common),
        train=data,
        model=tiny_lora_model(0.0),
    )
    _, acc, _ = run_tiny(
        tmp_path / "b",
        TrainConfig(batch_size=2, grad_accum=2, **common),
        train=data,
        model=tiny_lora_model(0.0),
    )
    _, small, _ = run_tiny(
        tmp_path / "c",
        TrainConfig(batch_size=2, grad_accum=1, **common),
        train=data,
        model=tiny_lora_model(0.0),
    )
    a, b, c = trainable_state(big), trainable_state(acc), trainable_state(small)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    assert any(
        not torch.allclose(a[n], c[n], rtol=1e-4, atol=1e-6) for n in a
    )  # the test can tell them apart


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    # A huge learning rate makes the weights overflow: the loss turns non-finite within a few steps.
    cfg = TrainConfig(
        max_steps=50, batch_size=4, lr=1e30, max_grad_norm=None, eval_every=100, save_every=1, keep_last=2
    )
    with pytest.raises(TrainingDivergedError, match=r"step (\d+): the loss is") as info:
        run_tiny(tmp_path, cfg, model=tiny_lora_model(0.0))
    bad_step = int(str(info.value).split(":")[0].split()[-1])
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert saved and saved[-1][0] == bad_step - 1
    assert str(saved[-1][1]) in str(info.value)
    ckpt.verify_checkpoint(saved[-1][1])
    good = load_file(saved[-1][1] / "trainable.safetensors")
    assert good and all(torch.isfinite(t).all() for t in good.values())


def test_early_stopping_keeps_best_checkpoint(tmp_path):
    # Validation rows contradict the training rows (same prompts, other answers): as the model learns
    # the training rows the validation loss rises, so early stopping must fire.
    train = make_examples(16, seed=11)
    val = [
        type(e)(
            e.input_ids,
            e.labels[: len(e.labels) // 2] + [(t + 7) % 300 + 4 for t in e.labels[len(e.labels) // 2 :]],
        )
        for e in train[:8]
    ]
    cfg = TrainConfig(
        max_steps=60,
        batch_size=4,
        lr=5e-3,
        eval_every=2,
        save_every=100,
        keep_last=1,
        early_stopping_patience=2,
        seed=0,
    )
    result, _, _ = run_tiny(tmp_path, cfg, train=train, val=val)
    assert result.stop_reason == "early_stopping"
    assert result.state.step < 60
    assert result.state.evals_since_best == 2
    best = result.state.best_step
    steps = [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert best in steps and result.state.step in steps
    state = json.loads(
        (tmp_path / "checkpoints" / ckpt.checkpoint_name(best) / "trainer_state.json").read_text()
    )
    assert state["best_step"] == best


def test_sigterm_saves_checkpoint_and_stops(tmp_path):
    """A real SIGTERM delivered mid-step: the loop finishes the step, checkpoints, and returns."""
    calls = {"n": 0}

    def collate_and_signal(examples):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return collate(examples)

    previous = signal.getsignal(signal.SIGTERM)
    cfg = TrainConfig(max_steps=40, batch_size=2, lr=1e-3, eval_every=100, save_every=100)
    result, _, _ = run_tiny(tmp_path, cfg, collate_fn=collate_and_signal)
    assert result.stop_reason == "signal" and result.signal == signal.SIGTERM
    assert result.state.step == 5
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [5]
    ckpt.verify_checkpoint(result.checkpoint)
    assert signal.getsignal(signal.SIGTERM) is previous
