"""The divergence against a sparse (cached) teacher: top-k buckets, or a sampled tail.

Per token: p = softmax(z_T / tau) is the teacher, q = softmax(z_S / tau) the student (the
loss has the student's whole row of logits), S the teacher's top-k ids, T the other ids (the
tail), P = sum_{j in T} p_j and Q = sum_{j in T} q_j the tail masses. Every divergence ddk
supports is a sum over the vocabulary of per-entry terms (``DIVERGENCE_TERMS``),
D(p, q) = sum_j f(p_j, q_j), with

    forward_kl       f(p, q) = p log(p / q)
    reverse_kl       f(p, q) = q log(q / p)
    js               f(p, q) = p/2 log(p / m) + q/2 log(q / m),   m = (p + q) / 2
    skew_kl          f(p, q) = p log(p / (λ p + (1 - λ) q))
    skew_reverse_kl  f(p, q) = q log(q / (λ q + (1 - λ) p))

(0 log 0 = 0), and every such f is positively homogeneous: f(c p, c q) = c f(p, q).

``topk`` (the cache holds S, log p_S and log P). Both distributions are coarsened onto the
same k + 1 buckets (the k ids, then "anything else"):

    D_topk = sum_{j in S} f(p_j, q_j) + f(P, Q)

Coarsening never increases a divergence of this kind, so D_topk <= D: exact at k = V, or when
the two tails have the same shape (p_j / P = q_j / Q on T), biased low otherwise, and so is its
gradient (benchmarks/bench_sparse_kl.py on the quick demo's models, k = 64, tau = 1: forward
KL -9 % before distillation, -16 % after; reverse KL -36 %, -38 %; more at tau = 2).

``sampled`` (the cache also holds m tail ids t_1..t_m, their log p_t, and the proposal's log
normaliser). The tail ids are drawn (by ``ddk.teacher.sampling``, when the cache is built)
by systematic sampling from the proposal

    pi_j = p_j^β / sum_{i in T} p_i^β     (j in T; β = PROPOSAL_POWER = 1/2)

t_s = F^-1((s + u) / m) for s = 0..m-1, F the proposal's CDF in token order and u one uniform
per token, a hash of (data, domain, sequence, position): a resumed cache is byte-identical.
Each t_s alone is distributed as pi, so with w_s = 1 / (m pi_{t_s}), for any g,
E[sum_s w_s g(t_s)] = sum_{j in T} g(j). (Systematic draws are negatively correlated: less
variance than m independent draws; a token with pi_j >= 1/m is always drawn.) β = 1/2 flattens
the teacher's tail so that the tokens a student over-weights are found more often: measured, it
costs forward KL almost nothing and helps the student-weighted divergences a lot. The estimate
is the exact head plus an importance-weighted tail:

    D_hat = sum_{j in S} f(p_j, q_j) + sum_s w_s (f(p_t, q_t) - c_t) + C,    t = t_s

with a control variate c whose tail sum C is exact. For reverse_kl, js and skew_reverse_kl
(``TANGENT_CONTROL``) it is the tangent plane of f at the bucket point (P, Q):

    c_j = a p_j + b q_j,   a = df/dp (P, Q),   b = df/dq (P, Q)   (a, b held fixed: no gradient)
    C = sum_{j in T} c_j = a P + b Q = f(P, Q)                    (Euler: f is homogeneous)

so D_hat = D_topk + an unbiased estimate of what the buckets miss, whose sampled terms only
carry the second-order shape mismatch of the two tails (their weights q_t / pi_t are the noisy
part: the tangent removes their first order). forward_kl and skew_kl take c = C = 0 (their
weights p_t / pi_t are bounded; the tangent's b q_t part would add q / pi noise instead): both
choices are measured by ``bench_sparse_kl.py --controls``.

Sampling does not depend on the student, so for every z_S

    E[D_hat] = D(p, q)   and   E[grad_z D_hat] = grad_z D(p, q)

exactly, for all five divergences at any tau; the gradient flows through q = softmax(z_S /
tau) over the whole row, as autograd differentiates the formula above. The cache stores log p
as float16, and the proposal, P and the weights are computed from those rounded values, so
this holds for the teacher the cache stores. k = V (an empty tail) gives D exactly. Limits:
- a token with p_j = 0 exactly (a -inf teacher logit) is never drawn: forward_kl and skew_kl
  have no term there; reverse_kl's term, q_j log(q_j / 0), is infinite in D too; js and
  skew_reverse_kl miss sum_{p_j = 0} (f(0, q_j) - c_j), i.e. q_j (log 2 / 2 - b) and
  q_j (log(1 / λ) - b): exact zeros are rare for softmax teachers;
- reverse_kl needs log p_j where the STUDENT puts mass, and teacher-side samples find those
  tokens only in proportion to p^β: unbiased, but its single-draw gradient is the noisiest
  (still closer to the dense one than top-k's: bench_sparse_kl.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddk.losses.divergences import (
    DIVERGENCE_TERMS,
    DIVERGENCES,
    DivergenceFn,
    DivergenceTermsFn,
)
from ddk.teacher.signals import SparseSignal, log_probs

TANGENT_CONTROL = frozenset({"reverse_kl", "js", "skew_reverse_kl"})
"""Divergences whose sampled tail is corrected around the top-k bucket (see the module doc)."""


# ---------------------------------------------------------------------------------- top-k
def student_buckets(student_logits: Tensor, ids: Tensor, tau: float) -> Tensor:
    """[n, k + 1] student log-probs at tau on the teacher's k ids, then the log tail mass."""
    log_q = log_probs(student_logits, tau)
    return torch.cat([log_q.gather(1, ids), _log_tail(log_q, ids)], dim=1)


def teacher_buckets(teacher: SparseSignal, dtype: torch.dtype) -> Tensor:
    """[n, k + 1] teacher log-probs: the stored top-k, then the stored log tail mass."""
    return torch.cat([teacher.logp.to(dtype), teacher.log_tail.to(dtype).unsqueeze(1)], dim=1)


def topk_divergence(
    student_logits: Tensor,
    teacher: SparseSignal,
    tau: float,
    divergence_fn: DivergenceFn,
    skew_lambda: float,
) -> Tensor:
    """[n] D_topk: the registered divergence on the k + 1 buckets."""
    student_b = student_buckets(student_logits, teacher.ids, tau)
    teacher_b = teacher_buckets(teacher, student_b.dtype)
    return divergence_fn(student_b, teacher_b, 1.0, skew_lambda)  # tau already applied


def _log_tail(log_q: Tensor, ids: Tensor) -> Tensor:
    """[n, 1] log of the mass outside ``ids``. A huge negative finite value (not -inf) masks
    the ids, so a row whose tail is empty (k = V) gives a finite value and gradient."""
    rest = log_q.scatter(1, ids, torch.finfo(log_q.dtype).min)
    return torch.logsumexp(rest, dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------- sampled
def sampled_divergence(
    student_logits: Tensor,
    teacher: SparseSignal,
    tau: float,
    terms_fn: DivergenceTermsFn,
    skew_lambda: float,
    control: bool,
) -> Tensor:
    """[n] D_hat: the exact top-k head plus the importance-weighted tail samples, corrected
    around the tail bucket when ``control`` (the tangent control variate; see the module doc)."""
    log_q = log_probs(student_logits, tau)
    dtype = log_q.dtype
    head = terms_fn(teacher.logp.to(dtype), log_q.gather(1, teacher.ids), skew_lambda).sum(-1)
    logw = teacher.sample_logw.to(dtype)
    weight = logw.exp()
    # An empty slot (weight 0) gets a finite stand-in log-prob: 0 * inf would be NaN.
    lp_t = torch.where(weight > 0, teacher.sample_logp.to(dtype), 0.0)
    lq_t = log_q.gather(1, teacher.sample_ids)
    sampled = terms_fn(lp_t, lq_t, skew_lambda)
    if not control:
        return head + (weight * sampled).sum(-1)
    log_P = teacher.log_tail.to(dtype).unsqueeze(1)
    log_Q = _log_tail(log_q, teacher.ids)
    # An empty teacher tail (k = V) samples nothing: a = b = 0 and finite stand-ins for P, Q.
    live = torch.isfinite(log_P)
    log_P = torch.where(live, log_P, 0.0)
    log_Q0 = torch.where(live, log_Q.detach(), 0.0)
    a, b = _tangent(terms_fn, log_P, log_Q0, skew_lambda)  # d f / d log P, d f / d log Q
    a, b = torch.where(live, a, 0.0), torch.where(live, b, 0.0)
    # c_t = a p_t / P + b q_t / Q0 (log coordinates); its exact tail sum a + b Q / Q0 = f(P, Q).
    ctl = a * (lp_t - log_P).exp() + b * (lq_t - log_Q0).exp()
    total = a + b * (torch.where(live, log_Q, 0.0) - log_Q0).exp()
    return head + (weight * (sampled - ctl)).sum(-1) + total.squeeze(1)


def _tangent(
    terms_fn: DivergenceTermsFn, log_P: Tensor, log_Q: Tensor, skew_lambda: float
) -> tuple[Tensor, Tensor]:
    """Gradients of f(P, Q) w.r.t. log P and log Q, i.e. (P df/dP, Q df/dQ): constants."""
    with torch.enable_grad():
        lp = log_P.detach().requires_grad_(True)
        lq = log_Q.detach().requires_grad_(True)
        a, b = torch.autograd.grad(terms_fn(lp, lq, skew_lambda).sum(), [lp, lq])
    return a, b


def sparse_divergence(
    student_logits: Tensor, teacher: SparseSignal, tau: float, divergence: str, skew_lambda: float
) -> Tensor:
    """[n] the divergence named ``divergence`` against a sparse signal: D_hat if the signal
    holds tail samples, D_topk if not."""
    if teacher.sampled:
        terms_fn = DIVERGENCE_TERMS[divergence]
        control = divergence in TANGENT_CONTROL
        return sampled_divergence(student_logits, teacher, tau, terms_fn, skew_lambda, control)
    return topk_divergence(student_logits, teacher, tau, DIVERGENCES[divergence], skew_lambda)


# ---------------------------------------------------------------------------------- signals
def slice_rows(teacher: SparseSignal, idx: Tensor) -> SparseSignal:
    return SparseSignal(*(None if t is None else t.index_select(0, idx) for t in teacher))


def topk_only(teacher: SparseSignal) -> SparseSignal:
    """The signal without its tail samples: what the top-k estimator reads."""
    return SparseSignal(teacher.ids, teacher.logp, teacher.log_tail)
