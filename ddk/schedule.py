"""The paper's learning-rate schedule: linear warm-up to `lr`, cosine decay to `min_lr`."""

from __future__ import annotations

import math

import torch


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


class Schedule:
    """The schedule of a run as a checkpointed state: torch's LambdaLR over `lr_lambda`. A
    resume with `--set trainer.lr` / `max_steps` continues from the saved position with the
    new peak and length (the restored scheduler would keep the old peak, the optimizer the
    old rate: both are recomputed as LambdaLR does)."""

    def __init__(self, optimizer, t):
        # On the prepared optimizer, whose param_groups always resolve to those that step (a
        # backend may swap the optimizer, e.g. DeepSpeedCPUAdam under ZeRO offload, whose
        # load_state_dict installs new groups). The scheduler itself stays unwrapped:
        # Accelerate would step it once per process.
        self.optimizer, self.lr = optimizer, t.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lr_lambda(lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps),
        )

    def last_lr(self) -> float:
        """The rate the coming step uses."""
        return self.scheduler.get_last_lr()[0]

    def step(self) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        s = self.scheduler
        s.load_state_dict(state)
        lam = s.lr_lambdas[0]
        s.base_lrs = [self.lr for _ in s.base_lrs]
        rates = [base * lam(s.last_epoch) for base in s.base_lrs]
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        s._last_lr = rates
