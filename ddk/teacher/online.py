"""The online teacher: a frozen model run forward on each micro-batch.

The signal is the teacher's last hidden state plus its LM head, not logits: the fused loss
builds teacher logits chunk by chunk, so full [tokens, vocab] teacher logits never exist.
"""

from __future__ import annotations

import contextlib

import torch

from ddk.models import hidden_and_head
from ddk.teacher.signals import Batch, DenseSignal


class OnlineTeacher:
    def __init__(self, model, autocast=contextlib.nullcontext):
        self.model = model
        self.autocast = autocast

    @torch.no_grad()
    def signal(self, batch: Batch) -> DenseSignal:
        with self.autocast():
            hidden, head = hidden_and_head(self.model, batch.input_ids)
        return DenseSignal(
            hidden.reshape(-1, hidden.shape[-1]), head.weight, getattr(head, "bias", None)
        )
