"""The paper's learning-rate schedule: linear warm-up to `lr`, cosine decay to `min_lr`."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_lambda(*, lr: float, min_lr: float, warmup_steps: int, max_steps: int):
    """Multiplier for torch's LambdaLR (the optimizer's base lr is `lr`)."""
    return lambda step: (
        lr_at(step, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, max_steps=max_steps) / lr
    )
