"""Learning-rate schedule shared by both stages: linear warm-up, then cosine decay to a floor (BLIP's recipe).

The factor is a pure function of the global step, so a run resumed from a checkpoint (which stores the
step) continues on exactly the same schedule; no scheduler state needs saving.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_factor: float) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): ramps 1/warmup .. 1, then cosine to ``min_factor``."""
    if total_steps <= 0:
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    """Set every parameter group's learning rate to its base rate times ``factor``."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor


def stage_lr_factor(train_cfg, step: int, steps_per_epoch: int, epochs: int) -> float:
    """``train.lr_schedule`` for a stage of ``epochs`` x ``steps_per_epoch`` optimizer steps."""
    if train_cfg.lr_schedule == "constant":
        return 1.0
    if train_cfg.lr_schedule != "cosine":
        raise ValueError(f"train.lr_schedule must be 'cosine' or 'constant', got {train_cfg.lr_schedule!r}")
    total = steps_per_epoch * epochs
    return lr_factor(step, total, round(train_cfg.warmup_fraction * total), train_cfg.min_lr_factor)
