"""The online teacher: a frozen model run forward on each micro-batch.

The signal is the teacher's last hidden state plus its LM head (and its own logit transform),
not logits: the fused loss builds teacher logits chunk by chunk, so full [tokens, vocab]
teacher logits never exist. The same forward gives `ddk cache-teacher` its rows: the top-k,
or the top-k plus sampled tail tokens.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ddk.logits import hidden_and_head, logit_transform
from ddk.teacher.perplexity import SharedPerplexities
from ddk.teacher.sampling import sampled_from_logits
from ddk.teacher.signals import Batch, DenseSignal, SparseSignal, sparse_from_logits


class OnlineTeacher:
    """A `TeacherSource` over a live model. `model=None`: a run that trains without the
    teacher's signal (cpt) but still wants its perplexities, which `perplexities` gives."""

    def __init__(
        self,
        model,
        autocast=contextlib.nullcontext,
        perplexities: SharedPerplexities | None = None,
    ):
        self.model = model
        self.autocast = autocast
        self.transform = logit_transform(model) if model is not None else None
        self._perplexities = perplexities

    @torch.no_grad()
    def signal(self, batch: Batch) -> DenseSignal:
        if self.model is None:
            raise RuntimeError("this run loaded no teacher model for its training signal")
        with self.autocast():
            hidden, head = hidden_and_head(self.model, batch.input_ids, batch.position_ids)
        return DenseSignal(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            getattr(head, "bias", None),
            self.transform,
        )

    @torch.no_grad()
    def topk(
        self, input_ids: torch.Tensor, *, vocab: int, k: int, tau: float, chunk: int,
        position_ids=None,
    ):  # fmt: skip
        """The exact top-k signal at `tau` of every position of `input_ids` (rows [B*L]),
        built `chunk` rows of logits at a time."""
        logits = self._logits(input_ids, vocab, chunk, position_ids)
        parts = [sparse_from_logits(z, k, tau) for _, z in logits]
        return _cat(parts)

    @torch.no_grad()
    def sampled(
        self,
        input_ids: torch.Tensor,
        *,
        vocab: int,
        k: int,
        samples: int,
        tau: float,
        chunk: int,
        uniforms: torch.Tensor,
        logp_dtype: torch.dtype | None = None,
        position_ids=None,
    ) -> tuple[SparseSignal, torch.Tensor]:
        """The top-k head plus `samples` tail draws at `tau` of every position of `input_ids`
        (rows [B*L], one uniform per row; `ddk.teacher.sampling.sampled_from_logits`), and the
        tail proposal's log normaliser [B*L]."""
        parts = [
            sampled_from_logits(
                z, k, samples, tau, uniforms[start : start + len(z)], logp_dtype=logp_dtype
            )
            for start, z in self._logits(input_ids, vocab, chunk, position_ids)
        ]
        signals, norms = zip(*parts)
        return _cat(signals), torch.cat(norms)

    def _logits(self, input_ids: torch.Tensor, vocab: int, chunk: int, position_ids=None):
        """(first row, float32 logits [<= chunk, vocab]) of each chunk of rows, after the
        teacher's logit transform: full [B*L, V] logits never exist."""
        with self.autocast():
            hidden, head = hidden_and_head(self.model, input_ids, position_ids)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        weight = head.weight[:vocab]
        bias = getattr(head, "bias", None)
        bias = None if bias is None else bias[:vocab]
        for start in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[start : start + chunk], weight, bias).float()
            if self.transform is not None:
                logits = self.transform(logits)
            yield start, logits

    def perplexities(self, split: str) -> dict[str, float] | None:
        return None if self._perplexities is None else self._perplexities.perplexities(split)

    @property
    def ppl_key(self) -> dict:
        return self._perplexities.key if self._perplexities is not None else {}

    @property
    def ppl_source(self) -> dict[str, str]:
        return self._perplexities.ppl_source if self._perplexities is not None else {}


def _cat(signals) -> SparseSignal:
    """The chunks' sparse signals as one (its absent sample fields stay absent)."""
    return SparseSignal(*(None if p[0] is None else torch.cat(p) for p in zip(*signals)))
