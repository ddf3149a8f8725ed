"""The divergence against a sparse (top-k) teacher: k buckets plus one tail bucket.

The cache stores, per token, the teacher's top-k ids S, their log-probs at temperature tau
``log p_i`` and the log of the rest of the mass ``log p_tail = log(1 - sum_{i in S} p_i)``.
Both distributions are coarsened onto the same k + 1 buckets (the k ids, then "anything
else"), with the student's side from its own logits z:

    q = softmax(z / tau),    q_tail = sum_{j not in S} q_j = 1 - sum_{i in S} q_i

and the divergence is taken between the two (k + 1)-bucket distributions. For forward KL:

    D(p || q) = sum_{i in S} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

with 0 log 0 = 0 (a tail of exactly 0, e.g. k = vocabulary size, adds nothing). Coarsening
never increases a KL (data processing inequality), so this is a lower bound of the exact
KL(p_T || p_S) that grows with k and equals it at k = V. The other divergences (reverse KL,
JS, skew KL/reverse KL) are likewise the registered function applied to the same k + 1
buckets: exact at k = V, an approximation that ignores how the tail mass is spread below.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddk.teacher.signals import SparseSignal


def student_buckets(student_logits: Tensor, ids: Tensor, tau: float) -> Tensor:
    """[n, k + 1] student log-probs at tau on the teacher's k ids, then the log tail mass."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    z = student_logits.to(dtype)
    log_q = torch.log_softmax(z if tau == 1 else z / tau, dim=-1)
    top = log_q.gather(1, ids)
    # The tail: logsumexp over the columns NOT in S. A huge negative finite value (not -inf)
    # masks S, so a row whose tail is empty (k = V) gives a finite value and a finite
    # gradient; its teacher tail probability is 0, so it adds nothing to the divergence.
    rest = log_q.scatter(1, ids, torch.finfo(dtype).min)
    tail = torch.logsumexp(rest, dim=-1, keepdim=True)
    return torch.cat([top, tail], dim=1)


def teacher_buckets(teacher: SparseSignal, dtype: torch.dtype) -> Tensor:
    """[n, k + 1] teacher log-probs: the stored top-k, then the stored log tail mass."""
    return torch.cat([teacher.logp.to(dtype), teacher.log_tail.to(dtype).unsqueeze(1)], dim=1)


def slice_rows(teacher: SparseSignal, idx: Tensor) -> SparseSignal:
    return SparseSignal(
        teacher.ids.index_select(0, idx),
        teacher.logp.index_select(0, idx),
        teacher.log_tail.index_select(0, idx),
    )
