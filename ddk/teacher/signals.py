"""What a teacher hands the loss for one micro-batch: a dense or a sparse (cached) signal, and
the `TeacherSource` interface every teacher (online, offline, ...) implements.

Both signals are row-aligned with the flattened student hidden states [N, H] (N = batch x
tokens), so the chunked loss can slice them with the same row indices. This module imports only
torch and numpy: the losses depend on it, and it depends on nothing of ddk's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor


class DenseSignal(NamedTuple):
    """A live teacher's last hidden states plus its LM head: logits are built chunk by chunk."""

    hidden: torch.Tensor  # [N, H_t]
    head_weight: torch.Tensor  # [V_t, H_t]
    head_bias: torch.Tensor | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    """The teacher's own elementwise logit transform (a scale or softcap), applied to the
    float32 logits of each chunk; None for plain ``hidden @ W.T + b``. The signal carries it:
    the loss needs nothing else to know about the teacher."""


class SparseSignal(NamedTuple):
    """The teacher's next-token distribution at temperature tau, per row, in a few entries.

    ``logp[n, j] = log softmax(z_T / tau)[ids[n, j]]`` over the top-k ids and ``log_tail[n] =
    log(1 - sum_j exp(logp[n, j]))``, the mass of every other token (``-inf`` when the k ids
    carry all the mass, e.g. k = vocabulary size). The logits z_T are the teacher's after its
    own logit transform.

    With the ``sample_*`` fields (all three or none) it also holds m tokens drawn from the tail
    (never a top-k id) with their teacher log-probs and log importance weights ``log(1 / (m pi))``,
    pi being the probability the draw had (``-inf``: an empty slot, weight 0). The loss then
    estimates the divergence without bias (``ddk.losses.sparse``); without them it uses k + 1
    buckets.
    """

    ids: torch.Tensor  # [N, k] int64
    logp: torch.Tensor  # [N, k] float32 (or float64)
    log_tail: torch.Tensor  # [N]
    sample_ids: torch.Tensor | None = None  # [N, m] int64
    sample_logp: torch.Tensor | None = None  # [N, m]
    sample_logw: torch.Tensor | None = None  # [N, m]

    @property
    def sampled(self) -> bool:
        return self.sample_ids is not None


class MergeGroups(NamedTuple):
    """`distill.cross_mismatch: merge`: the byte spans (GOLD's alignment groups) that start at an
    aligned position whose next tokens differ and end at the next boundary both sides share.
    A span's loss sits at its student LAST row (mode 3), whose teacher row is the teacher's last
    position in the span; the earlier rows of both sides only contribute the probability of
    their actual next token (`ddk.losses.crosstok_merge`)."""

    student_row: torch.Tensor  # [N] int64: the span's last row for each row of a span, else -1
    teacher_hidden: torch.Tensor  # [P, H_t]: the teacher's earlier positions of every span
    teacher_ids: torch.Tensor  # [P] int64: the teacher token each of them predicts (the text's)
    teacher_row: torch.Tensor  # [P] int64: the student row of the span's loss


class MergeTerms(NamedTuple):
    """Per student row, what the loss's pre-pass computes from `MergeGroups` (chunked, no grad)
    so that each chunk's merged-span loss needs only its own rows."""

    student_prefix: torch.Tensor  # [N] at a span's last row: log Π q(earlier student tokens)
    teacher_prefix: torch.Tensor  # [N] at a span's last row: log Π p(earlier teacher tokens)
    weight: torch.Tensor  # [N] at a span's earlier rows: d(span loss)/d(student_prefix)
    label: torch.Tensor  # [N] the student's next token (the text's)


class CrossSignal(NamedTuple):
    """A live teacher with ANOTHER tokenizer, gathered to the student's rows by byte alignment
    (`ddk.teacher.alignment`): row n holds the teacher's hidden state at the position that has
    seen the same text as student row n, and `mode[n]` says how the loss compares them
    (`ddk.losses.crosstok`): 0 no aligned teacher position (no divergence), 1 exact (both next
    tokens cover the same bytes: KL over the shared token strings), 2 otherwise (a
    vocabulary-free distance), 3 the last row of a merged span (`merge`)."""

    hidden: torch.Tensor  # [N, H_t]; rows with mode 0 are ignored
    head_weight: torch.Tensor  # [>= teacher_vocab, H_t]
    mode: torch.Tensor  # [N] int8
    student_shared: torch.Tensor  # [M] int64: student ids of the token strings both share
    teacher_shared: torch.Tensor  # [M] int64: the teacher's ids of the same strings
    teacher_vocab: int
    head_bias: torch.Tensor | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    merge: MergeGroups | None = None  # cross_mismatch: merge (mode 3 rows)
    merge_terms: MergeTerms | None = None  # filled by the loss from `merge`


class SparseCrossSignal(NamedTuple):
    """A teacher with ANOTHER tokenizer read from an offline cache (`ddk cache-teacher` with
    `teacher.tokenizer: cross`): per student row, the teacher's top-k ids (its vocabulary) and
    log-probs at tau, the log mass outside them, the log mass on the shared token strings and
    the alignment mode (as `CrossSignal`). The loss is `ddk.losses.crosstok_sparse`."""

    ids: torch.Tensor  # [N, k] int64 teacher ids
    logp: torch.Tensor  # [N, k]
    log_tail: torch.Tensor  # [N]
    log_shared: torch.Tensor  # [N]
    mode: torch.Tensor  # [N] int8: 0 none, 1 exact, 2 other
    student_shared: torch.Tensor  # [M] int64: student ids of the shared token strings
    shared_index: torch.Tensor  # [V_T] int64: each teacher id's index among them (-1: none)

    @property
    def row_fields(self) -> tuple[torch.Tensor, ...]:
        """The per-row tensors (ids, logp, log_tail, log_shared, mode)."""
        return tuple(self[:5])


class CompositeSignal(NamedTuple):
    """Several teachers' signals over one micro-batch (`model.teachers` whose teachers cannot
    share one dense signal, e.g. teachers with other tokenizers): each part is (the flattened
    student rows it covers [n_i] int64, that teacher's signal over exactly those rows in that
    order). The parts cover every row once. The loss runs each part through its own signal's
    path on those rows and sums the sums (`ddk.losses.chunked`)."""

    parts: tuple[
        tuple[torch.Tensor, DenseSignal | SparseSignal | CrossSignal | SparseCrossSignal], ...
    ]


TeacherSignal = DenseSignal | SparseSignal | CrossSignal | SparseCrossSignal | CompositeSignal


class Batch(NamedTuple):
    """One micro-batch: the student's inputs plus each row's identity, so a cache can look rows up."""

    input_ids: torch.Tensor  # [B, T]
    rows: np.ndarray  # [B, 2] int: (domain index in the run's domain list, train sequence index)
    position_ids: torch.Tensor | None = None  # chat data: restarting at each packed conversation


@runtime_checkable
class TeacherSource(Protocol):
    """Where the teacher comes from: its signal for a micro-batch, and its per-domain
    perplexities on a held-out split (what DDK's Eq. 1/2 and the reports divide by)."""

    def signal(self, batch: Batch) -> TeacherSignal: ...

    def perplexities(self, split: str) -> dict[str, float] | None: ...


def log_probs(logits: Tensor, tau: float) -> Tensor:
    """log softmax(logits / tau) in (at least) float32: the teacher's side of a sparse signal
    and the student's side of its divergence (``ddk.losses.sparse``)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(z if tau == 1 else z / tau, dim=-1)


def sparse_from_logits(teacher_logits: Tensor, k: int, tau: float) -> SparseSignal:
    """The top-k signal of full teacher logits [n, V] (what `ddk cache-teacher` stores, before
    rounding): used by the cache builder and by tests as the exact reference."""
    log_p = log_probs(teacher_logits, tau)
    logp, ids = log_p.topk(k, dim=-1)
    if k == log_p.shape[1]:
        log_tail = torch.full_like(logp[:, 0], -torch.inf)
    else:
        log_tail = torch.logsumexp(log_p.scatter(1, ids, -torch.inf), dim=-1)
    return SparseSignal(ids, logp, log_tail)
