"""The student and the fused loss as one module (`DistillStep`), so DDP, FSDP2 and DeepSpeed
wrap a single forward: hidden states and LM head of the student, then CE + γ·divergence
against the teacher's signal, chunk by chunk (`ddk.losses`)."""

from __future__ import annotations

import torch

from ddk.config import Config
from ddk.logits import hidden_and_head, logit_transform
from ddk.losses import LossSums, loss_from_config


class DistillStep(torch.nn.Module):
    """The student plus the fused loss, as one module, so DDP sees a single forward."""

    def __init__(self, student, cfg: Config, vocab_size: int):
        super().__init__()
        self.student = student
        self.student_transform = logit_transform(student)
        self.loss = loss_from_config(cfg.distill, vocab_size)

    def forward(self, input_ids, labels, teacher=None, position_ids=None) -> LossSums:
        """``teacher``: a DenseSignal, a SparseSignal (offline cache) or None. ``labels``:
        IGNORE_INDEX outside a chat loss mask; ``position_ids``: packed conversations (or None)."""
        hidden, head = hidden_and_head(self.student, input_ids, position_ids)
        return self.loss(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            labels.reshape(-1),
            teacher,  # carries the teacher's own logit transform
            getattr(head, "bias", None),
            student_transform=self.student_transform,
        )

    @property
    def _no_split_modules(self):
        # Accelerate's FSDP2 TRANSFORMER_BASED_WRAP shards the student's decoder layers.
        return getattr(self.student, "_no_split_modules", None)

    def tie_weights(self) -> None:
        # Accelerate re-ties after FSDP2's meta-device loading (fsdp_cpu_ram_efficient_loading).
        self.student.tie_weights()
