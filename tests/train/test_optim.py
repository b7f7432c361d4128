from __future__ import annotations

import math

import pytest
import torch

from qlorakit.config import TrainConfig
from qlorakit.core.errors import ConfigError
from qlorakit.train.optim import build_optimizer, lr_at, steps_per_epoch, total_steps
from qlorakit.train.sampler import BatchOrder, epoch_permutation


def test_constant_schedule_with_warmup():
    lrs = [lr_at(s, base_lr=1.0, schedule="constant", warmup_steps=4, total_steps=10) for s in range(10)]
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_linear_schedule_values():
    lrs = [lr_at(s, base_lr=2e-4, schedule="linear", warmup_steps=2, total_steps=6) for s in range(6)]
    # warmup 1/2, 2/2; then decay over 4 steps: 1, 3/4, 1/2, 1/4
    assert lrs == pytest.approx([1e-4, 2e-4, 2e-4, 1.5e-4, 1e-4, 0.5e-4])


def test_cosine_schedule_values_and_shape():
    total, warm = 20, 0
    lrs = [
        lr_at(s, base_lr=1.0, schedule="cosine", warmup_steps=warm, total_steps=total) for s in range(total)
    ]
    for s, lr in enumerate(lrs):
        assert lr == pytest.approx(0.5 * (1 + math.cos(math.pi * s / total)))
    assert lrs[0] == 1.0
    assert lrs[10] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert min(lrs) > 0


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="train.schedule"):
        lr_at(0, base_lr=1.0, schedule="exp", warmup_steps=0, total_steps=5)


def test_adamw_default():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([p], TrainConfig(lr=1e-3, weight_decay=0.01))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.01


def test_no_trainable_parameters_is_a_config_error():
    p = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer([p], TrainConfig())


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers_need_cuda(name):
    p = torch.nn.Parameter(torch.zeros(3))
    if torch.cuda.is_available():
        opt = build_optimizer([p], TrainConfig(optim=name))
        assert type(opt).__module__.startswith("bitsandbytes")
    else:
        with pytest.raises(ConfigError, match=f"train.optim={name!r} needs a CUDA GPU"):
            build_optimizer([p], TrainConfig(optim=name))


def test_total_steps_with_epochs():
    cfg = TrainConfig(max_steps=1000, epochs=2.0, batch_size=4, grad_accum=2)
    assert steps_per_epoch(100, 4, 2, 1) == 13  # ceil(100 / 8)
    assert total_steps(cfg, 100, world_size=1) == 26
    assert total_steps(cfg, 100, world_size=2) == 14
    assert total_steps(TrainConfig(max_steps=5, epochs=2.0), 100, 1) == 5


def test_batch_order_is_a_deterministic_permutation_per_epoch():
    order = BatchOrder(10, seed=3)
    stream = [order.index(p) for p in range(30)]
    for e in range(3):
        assert sorted(stream[10 * e : 10 * e + 10]) == list(range(10))
        assert stream[10 * e : 10 * e + 10] == epoch_permutation(10, 3, e)
    assert stream[:10] != stream[10:20]
    assert [BatchOrder(10, seed=3).index(p) for p in range(30)] == stream
    assert [BatchOrder(10, seed=4).index(p) for p in range(10)] != stream[:10]


def test_rank_shards_equal_one_big_batch():
    order = BatchOrder(7, seed=0)
    big = order.micro_batch(position=12, batch_size=4)
    shards = order.micro_batch(12, 2, rank=0) + order.micro_batch(12, 2, rank=1)
    assert big == shards
    # crossing an epoch boundary continues into the next epoch's permutation
    assert order.micro_batch(5, 4) == [order.index(p) for p in range(5, 9)]
