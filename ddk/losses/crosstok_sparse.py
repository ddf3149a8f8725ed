"""The cross-tokenizer divergence (`ddk.losses.crosstok`) from a SPARSE teacher row: what an
offline cache of a teacher with another tokenizer holds per student position (`ddk
cache-teacher` with `teacher.tokenizer: cross`, cache format 3; read back as a
`SparseCrossSignal`), tested against the online loss (tests/test_crosstok_sparse.py).

Per student row the teacher row holds, at temperature τ and in the TEACHER's vocabulary: its
top-k ids and log-probs log p_S, the log tail mass log P (as `ddk.losses.sparse`), the log of
its mass on the M token strings both vocabularies share, log P_sh = log Σ_{j ∈ T_shared} p_j,
and the row's alignment mode (0 none, 1 exact, 2 other). ``shared_index`` maps each teacher id
to its index in the shared list (-1: not shared).

- **exact rows**: the online loss is D(p|shared, q|shared) over the M shared strings, each side
  renormalised over them. Offline, both sides are coarsened onto the same buckets (as the
  top-k estimator does): the shared strings among the teacher's top-k, then "every other
  shared string" (teacher: 1 − Σ_{S ∩ shared} p_j / P_sh; student: the rest of q|shared):

      D_topk = Σ_{j ∈ S ∩ shared} f(p_j / P_sh, q̃_j) + f(rest_T, rest_S)

  a lower bound of the online D (coarsening never increases it), exact when every shared
  string with mass is in the top-k (k = V_T).
- **other rows** (ULD): the teacher's sorted distribution is known down to rank k, then only
  its tail mass P, spread evenly over its V_T − k other ranks (each at most p_(k), so the order
  holds):

      ULD_topk = Σ_{i ≤ k} |sort↓(p)_i − sort↓(q)_i| + Σ_{i > k} |p̄_i − sort↓(q)_i|,
      p̄_i = P / (V_T − k) for i ≤ V_T, 0 beyond (i up to max(V_S, V_T))

  exact at k = V_T and whenever the teacher's tail is flat; otherwise neither bound (summing
  the student's tail into one bucket instead, |P − Σ_{i>k} sort↓(q)_i|, is a lower bound but
  loses 69 % of the loss on the tests' near-uniform tiny teacher at k = 64).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from ddk.losses.crosstok import EXACT, MISMATCH
from ddk.teacher.signals import CrossSignal, log_probs


class SparseCrossRows(NamedTuple):
    """One chunk's sparse teacher rows (module doc), aligned with the student's rows."""

    ids: Tensor  # [n, k] teacher ids of its top-k
    logp: Tensor  # [n, k] their log-probs at tau
    log_tail: Tensor  # [n] log mass outside the top-k
    log_shared: Tensor  # [n] log mass on the shared token strings
    mode: Tensor  # [n] int8: 0 none, 1 exact, 2 other


def teacher_shared_mass(teacher_logits: Tensor, teacher_shared: Tensor, tau: float) -> Tensor:
    """[n] log P_sh: what a cache stores next to the top-k, from the teacher's full rows."""
    return log_probs(teacher_logits, tau).index_select(1, teacher_shared).logsumexp(-1)


def shared_index(teacher_shared: Tensor, teacher_vocab: int) -> Tensor:
    """[V_T] each teacher id's index in the shared list (-1: a string the student lacks)."""
    index = torch.full((teacher_vocab,), -1, dtype=torch.long, device=teacher_shared.device)
    index[teacher_shared] = torch.arange(len(teacher_shared), device=teacher_shared.device)
    return index


@torch.no_grad()
def sparse_cross_rows(
    signal: CrossSignal, k: int, tau: float, chunk: int = 1024
) -> SparseCrossRows:
    """The rows a cache stores for a live `CrossSignal`: per student row the teacher's top-k
    (its vocabulary) at tau, log tail and log shared masses, and the alignment mode, computed
    `chunk` rows at a time (no [rows, V_T] tensor)."""
    parts = []
    for start in range(0, signal.hidden.shape[0], chunk):
        z = F.linear(signal.hidden[start : start + chunk], signal.head_weight, signal.head_bias)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        z = (z if signal.transform is None else signal.transform(z))[:, : signal.teacher_vocab]
        log_p = log_probs(z, tau)
        logp, ids = log_p.topk(k, dim=-1)
        tail = log_p.scatter(1, ids, float("-inf")).logsumexp(-1)
        shared = log_p.index_select(1, signal.teacher_shared.to(z.device)).logsumexp(-1)
        parts.append((ids, logp, tail, shared))
    return SparseCrossRows(*(torch.cat(t) for t in zip(*parts)), signal.mode)


def _exact_rows(z_s: Tensor, rows: SparseCrossRows, student_shared, shared_index, fn, tau, lam):
    """[n] D_topk of exact rows (module doc), through the run's divergence `fn` on buckets."""
    neg = torch.finfo(torch.float32).min
    log_q = log_probs(z_s.index_select(1, student_shared), tau)  # [n, M] q|shared
    log_q = torch.cat([log_q, log_q.new_full((log_q.shape[0], 1), neg)], dim=1)  # M: no string
    idx = shared_index.to(rows.ids.device)[rows.ids]  # [n, k]
    shared = idx >= 0
    idx = torch.where(shared, idx, log_q.shape[1] - 1)
    q_head = log_q.gather(1, idx)
    q_rest = log_q.scatter(1, idx, neg).logsumexp(-1, keepdim=True)
    p_head = torch.where(
        shared, rows.logp.to(log_q.dtype) - rows.log_shared.to(log_q.dtype)[:, None], neg
    )
    head_mass = p_head.exp().sum(-1, keepdim=True).clamp(max=1.0)
    p_rest = torch.log1p(-head_mass).clamp(min=neg)
    p_rest = torch.where(q_rest > neg / 2, p_rest, neg)  # the head holds every shared string
    student_b = torch.cat([q_head, q_rest], dim=1)
    teacher_b = torch.cat([p_head, p_rest], dim=1)
    return fn(student_b, teacher_b, 1.0, lam)  # tau already applied


def _uld_rows(z_s: Tensor, rows: SparseCrossRows, tau: float, teacher_vocab: int) -> Tensor:
    """[n] ULD_topk (module doc): the teacher's tail spread evenly over its V_T - k ranks."""
    q = log_probs(z_s, tau).exp().sort(dim=-1, descending=True).values
    p = rows.logp.to(q.dtype).exp().sort(dim=-1, descending=True).values
    k, width = p.shape[-1], max(q.shape[-1], teacher_vocab)
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    flat = rows.log_tail.to(q.dtype).exp() / max(teacher_vocab - k, 1)
    tail = flat[:, None].expand(-1, teacher_vocab - k)
    p = torch.nn.functional.pad(torch.cat([p, tail], dim=1), (0, width - teacher_vocab))
    return (q - p).abs().sum(-1)


def sparse_cross_divergence(
    student_logits: Tensor,
    rows: SparseCrossRows,
    student_shared: Tensor,
    shared_index: Tensor,
    divergence_fn,
    tau: float,
    skew_lambda: float,
    mismatch: str = "uld",
) -> Tensor:
    """Per-row divergence of one chunk against sparse teacher rows (module doc)."""
    if mismatch == "merge":  # needs the teacher's span-prefix probabilities, not stored here
        raise ValueError("cross_mismatch 'merge' needs a live teacher; use 'uld' or 'skip'")
    mode = rows.mode.to(student_logits.device)
    out = torch.zeros(student_logits.shape[0], dtype=student_logits.dtype,
                      device=student_logits.device)  # fmt: skip
    exact = (mode == EXACT).nonzero().squeeze(1)
    if exact.numel():
        part = SparseCrossRows(*(t.index_select(0, exact) for t in rows))
        d = _exact_rows(student_logits.index_select(0, exact), part, student_shared,
                        shared_index, divergence_fn, tau, skew_lambda)  # fmt: skip
        out = out.index_put((exact,), d.to(out.dtype))
    other = (mode == MISMATCH).nonzero().squeeze(1)
    if other.numel() and mismatch == "uld":
        part = SparseCrossRows(*(t.index_select(0, other) for t in rows))
        d = _uld_rows(student_logits.index_select(0, other), part, tau, len(shared_index))
        out = out.index_put((other,), d.to(out.dtype))
    return out
