"""The divergence against a teacher with another tokenizer, per aligned row (`CrossSignal`).

Rows are student positions; each aligned one has the teacher position that has seen the same
text (`ddk.teacher.alignment`). With p = softmax(z_T / τ) (teacher vocabulary V_T) and
q = softmax(z_S / τ) (student vocabulary V_S):

- **exact rows** (both next tokens cover the same bytes): the run's divergence D (forward KL by
  default) between the two distributions restricted to the M token strings both vocabularies
  hold, mapped one-to-one, each renormalised over them:

      D( softmax(z_T[T_shared] / τ), softmax(z_S[S_shared] / τ) )

  With one tokenizer, S_shared = T_shared = every id, and this is exactly today's D.
- **other aligned rows** ("uld", Boizard et al. 2024, Universal Logit Distillation): the
  L1 distance between the two probability vectors sorted in decreasing order, the shorter one
  padded with zeros (the closed-form Wasserstein-1 distance under a uniform transport cost),

      ULD = Σ_k | sort↓(p)_k − sort↓(q)_k |,  k = 1 .. max(V_S, V_T)

  or, "merge" (TRL's GOLD), the same distance between the two sides' probabilities of the
  whole byte span up to the next shared boundary, each merged along the text by the chain
  rule, at the span's last student row (`ddk.losses.crosstok_merge` has the formula),
  or nothing ("skip": exact rows only, the ablation measured in the README).
- rows without an aligned teacher position: 0.

Computed per chunk of rows from the chunk's logits only (`ddk.losses.chunked`): no
[tokens, vocab] tensor of either model exists.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddk.losses import crosstok_merge
from ddk.teacher.signals import CrossSignal, MergeTerms, log_probs

NONE, EXACT, MISMATCH = 0, 1, 2
MISMATCH_LOSSES = ("uld", "merge", "skip")


def uld_distance(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """Per-row Σ_k |sort↓(p)_k − sort↓(q)_k| over max(V_S, V_T) entries (zero-padded)."""
    q = log_probs(student_logits, tau).exp().sort(dim=-1, descending=True).values
    with torch.no_grad():
        p = log_probs(teacher_logits, tau).exp().sort(dim=-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    p = torch.nn.functional.pad(p.to(q.dtype), (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)


def cross_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    teacher: CrossSignal,
    divergence_fn,
    tau: float,
    skew_lambda: float,
    mismatch: str = "uld",
) -> Tensor:
    """Per-row divergence of one chunk (module doc); `teacher` holds the chunk's rows."""
    mode = teacher.mode.to(student_logits.device)
    out = torch.zeros(student_logits.shape[0], dtype=student_logits.dtype,
                      device=student_logits.device)  # fmt: skip
    exact = (mode == EXACT).nonzero().squeeze(1)
    if exact.numel():
        z_s = student_logits.index_select(0, exact).index_select(1, teacher.student_shared)
        z_t = teacher_logits.index_select(0, exact).index_select(1, teacher.teacher_shared)
        out = out.index_put((exact,), divergence_fn(z_s, z_t, tau, skew_lambda).to(out.dtype))
    other = (mode == MISMATCH).nonzero().squeeze(1)
    if other.numel() and mismatch == "uld":
        d = uld_distance(student_logits.index_select(0, other),
                         teacher_logits.index_select(0, other), tau)  # fmt: skip
        out = out.index_put((other,), d.to(out.dtype))
    if mismatch == "merge":
        out = out + crosstok_merge.merge_divergence(student_logits, teacher_logits, teacher, tau)
    return out


def slice_rows(teacher: CrossSignal, idx: Tensor) -> CrossSignal:
    """The signal's rows `idx` (one chunk), its merged-span terms included."""
    terms = teacher.merge_terms
    if terms is not None:
        terms = MergeTerms(*(t.index_select(0, idx) for t in terms))
    return teacher._replace(hidden=teacher.hidden.index_select(0, idx).detach(),
                            mode=teacher.mode.index_select(0, idx), merge=None,
                            merge_terms=terms)  # fmt: skip


def full_cross_divergence(student_logits: Tensor, teacher_logits: Tensor, teacher: CrossSignal,
                          labels: Tensor, divergence_fn, tau: float, skew_lambda: float,
                          mismatch: str, ignore_index: int) -> Tensor:  # fmt: skip
    """`cross_divergence` over ALL rows at once (full logits, plain autograd), the merged spans
    computed directly from `labels` (`ddk.losses.crosstok_merge`): the reference path."""
    rowwise = "skip" if mismatch == "merge" else mismatch
    out = cross_divergence(student_logits, teacher_logits, teacher, divergence_fn, tau,
                           skew_lambda, rowwise)  # fmt: skip
    if mismatch == "merge":
        out = out + crosstok_merge.naive_merge_divergence(
            student_logits, teacher, labels, tau, ignore_index
        )
    return out
