"""The online teacher: a frozen model run forward on each micro-batch.

The signal is the teacher's last hidden state plus its LM head, not logits: the fused loss
builds teacher logits chunk by chunk, so full [tokens, vocab] teacher logits never exist.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from ddk.models import hidden_and_head


class TeacherSignal(NamedTuple):
    hidden: torch.Tensor  # [tokens, H_t]
    head_weight: torch.Tensor  # [V_t, H_t]
    head_bias: torch.Tensor | None


class OnlineTeacher:
    def __init__(self, model, autocast=contextlib.nullcontext):
        self.model = model
        self.autocast = autocast

    @torch.no_grad()
    def signal(self, input_ids: torch.Tensor) -> TeacherSignal:
        with self.autocast():
            hidden, head = hidden_and_head(self.model, input_ids)
        return TeacherSignal(
            hidden.reshape(-1, hidden.shape[-1]), head.weight, getattr(head, "bias", None)
        )
