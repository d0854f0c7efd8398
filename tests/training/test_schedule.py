"""Learning-rate schedule: warm-up, cosine decay to the floor, a pure function of the step (resume-safe)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dashclip_core.config import TrainConfig
from dashclip_core.training.schedule import apply_lr, lr_factor, stage_lr_factor


def test_warmup_then_cosine_to_the_floor():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)  # first warm-up step: 1/10
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)  # cosine starts at the top
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 100, 10, 0.1) == pytest.approx(0.1)  # past the end: the floor
    values = [lr_factor(s, 100, 10, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_stage_factor_constant_and_unknown():
    assert stage_lr_factor(TrainConfig(lr_schedule="constant"), 7, 10, 3) == 1.0
    assert stage_lr_factor(TrainConfig(warmup_fraction=0.0, min_lr_factor=0.0), 30, 10, 3) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="train.lr_schedule"):
        stage_lr_factor(TrainConfig(lr_schedule="linear"), 0, 10, 3)


def test_apply_lr_scales_each_group_from_its_own_base():
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-4},
                           {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3}])
    apply_lr(opt, [1e-4, 1e-3], 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-5, 5e-4])
