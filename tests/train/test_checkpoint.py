from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from helpers.tinytrain import SINGLE, run_tiny, tiny_lora_model, trainable_state
from qlorakit.config import TrainConfig
from qlorakit.core.errors import CheckpointError
from qlorakit.train import checkpoint as ckpt
from qlorakit.train.loop import restore_rng, restore_training_state
from qlorakit.train.optim import build_optimizer, trainable_named_parameters


def _files(path):
    return sorted(p.name for p in path.iterdir())


def test_rng_state_round_trip():
    torch.manual_seed(5)
    random.seed(6)
    np.random.seed(7)
    blob = ckpt.capture_rng_state()
    expected = (torch.rand(4), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    ckpt.restore_rng_state(blob)
    assert torch.equal(torch.rand(4), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_checkpoint_layout_no_pickle_and_manifest(tmp_path):
    cfg = TrainConfig(max_steps=3, batch_size=2, lr=1e-3, save_every=3, eval_every=100)
    run_tiny(tmp_path, cfg)
    path = tmp_path / "checkpoints" / "step-000003"
    assert _files(path) == [
        "manifest.json",
        "optimizer.json",
        "optimizer.safetensors",
        "rng.json",
        "rng.safetensors",
        "trainable.safetensors",
        "trainer_state.json",
    ]
    manifest = ckpt.verify_checkpoint(path)
    assert manifest["complete"] is True and manifest["step"] == 3
    assert set(manifest["files"]) == set(_files(path)) - {"manifest.json"}
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["position"] == 6 and state["world_size"] == 1
    rng = json.loads((path / "rng.json").read_text())
    assert set(rng["rank0"]) == {"python", "numpy"}
    for file in path.iterdir():  # safetensors or JSON, nothing else
        head = file.read_bytes()[:1]
        assert file.suffix in (".json", ".safetensors") and head != b"\x80"  # pickle protocol marker


def test_optimizer_state_round_trip_is_exact(tmp_path):
    model = tiny_lora_model()
    named = trainable_named_parameters(model)
    opt = build_optimizer((p for _, p in named), TrainConfig(lr=1e-3))
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt.step()
    names = [n for n, _ in named]
    tensors, meta = ckpt.split_optimizer_state(opt.state_dict(), names)
    json.dumps(meta)
    back = ckpt.join_optimizer_state(tensors, meta, names, "test")
    fresh = build_optimizer((p for _, p in named), TrainConfig(lr=1e-3))
    fresh.load_state_dict(back)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])
    with pytest.raises(CheckpointError, match="other trainable parameters"):
        ckpt.join_optimizer_state(tensors, meta, names[:-1], "test")


def test_corrupted_or_unfinished_checkpoints_are_skipped(tmp_path):
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=1e-3, save_every=2, eval_every=100, keep_last=3)
    run_tiny(tmp_path, cfg)
    root = tmp_path / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 4]
    newest = root / "step-000004"
    # Truncate a tensor file: the checksum (and size) no longer match.
    data = (newest / "optimizer.safetensors").read_bytes()
    (newest / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    notes: list[str] = []
    assert ckpt.latest_valid_checkpoint(root, notes) == root / "step-000002"
    assert "optimizer.safetensors" in notes[0]
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        ckpt.load_checkpoint(newest, [])
    # A same-size corruption is caught by the checksum.
    older = root / "step-000002"
    blob = bytearray((older / "trainable.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (older / "trainable.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="checksum"):
        ckpt.verify_checkpoint(older)
    # A folder without a manifest (writer killed) is never loaded.
    (root / "step-000006").mkdir()
    (root / "step-000006" / "trainable.safetensors").write_bytes(b"partial")
    assert ckpt.latest_valid_checkpoint(root) is None
    # Leftover temporary folders of a killed writer are recognised and removed.
    stale = root / ".step-000008.abc123.tmp"
    stale.mkdir()
    assert ckpt.remove_stale_temporaries(root) == [stale] and not stale.exists()


def test_in_process_resume_is_bit_identical(tmp_path):
    cfg = TrainConfig(max_steps=6, batch_size=2, lr=3e-3, save_every=3, eval_every=2, keep_last=5, seed=9)
    _, straight, _ = run_tiny(tmp_path / "a", cfg)
    expected = trainable_state(straight)

    run_tiny(tmp_path / "b", cfg)
    # Simulate a resume: fresh model + optimizer, restored from the step-3 checkpoint, then continue.
    model = tiny_lora_model()
    named = trainable_named_parameters(model)
    opt = build_optimizer((p for _, p in named), cfg)
    loaded = ckpt.load_checkpoint(tmp_path / "b" / "checkpoints" / "step-000003", [n for n, _ in named])
    state = restore_training_state(loaded, model, opt, SINGLE)
    assert state.step == 3
    torch.manual_seed(12345)  # garbage: restore_rng must bring back the saved streams
    restore_rng(loaded, SINGLE)
    out = tmp_path / "c"
    (out / "checkpoints").mkdir(parents=True)
    rng_before = torch.get_rng_state()
    _, resumed, _ = run_tiny(out, cfg, model=model, optimizer=opt, state=state, reseed=False)
    assert not torch.equal(rng_before, torch.get_rng_state())  # dropout drew from the restored stream
    got = trainable_state(resumed)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_world_size_mismatch_is_refused(tmp_path):
    cfg = TrainConfig(max_steps=2, batch_size=2, lr=1e-3, save_every=2, eval_every=100)
    run_tiny(tmp_path, cfg)
    model = tiny_lora_model()
    named = trainable_named_parameters(model)
    opt = build_optimizer((p for _, p in named), cfg)
    loaded = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step-000002", [n for n, _ in named])
    two = type(SINGLE)(rank=0, world_size=2, local_rank=0, device=SINGLE.device, backend="gloo")
    with pytest.raises(CheckpointError, match="saved by 1 process"):
        restore_training_state(loaded, model, opt, two)


def test_config_compatibility_names_the_changed_key(tmp_path):
    saved = {"model": {"name": "a"}, "seed": 1}
    ckpt.check_compatible(saved, {"model": {"name": "a"}, "seed": 1}, tmp_path)
    with pytest.raises(CheckpointError, match="seed: checkpoint 1 vs now 2"):
        ckpt.check_compatible(saved, {"model": {"name": "a"}, "seed": 2}, tmp_path)


def test_prune_keeps_last_and_best(tmp_path):
    root = tmp_path
    for step in (1, 2, 3, 4, 5):
        (root / ckpt.checkpoint_name(step)).mkdir()
    removed = ckpt.prune_checkpoints(root, keep_last=2, keep_steps={2})
    assert sorted(p.name for p in removed) == ["step-000001", "step-000003"]
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 4, 5]
