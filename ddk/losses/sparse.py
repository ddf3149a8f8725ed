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
normaliser). The tail ids are drawn by systematic sampling from the proposal

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

import math

import numpy as np
import torch
from torch import Tensor

from ddk.losses.divergences import (
    DIVERGENCE_TERMS,
    DIVERGENCES,
    DivergenceFn,
    DivergenceTermsFn,
)
from ddk.teacher.signals import SparseSignal

PROPOSAL_POWER = 0.5
"""β of the tail proposal pi ∝ p^β (a choice, measured by benchmarks/bench_sparse_kl.py)."""

TANGENT_CONTROL = frozenset({"reverse_kl", "js", "skew_reverse_kl"})
"""Divergences whose sampled tail is corrected around the top-k bucket (see the module doc)."""


# ---------------------------------------------------------------------------------- top-k
def student_buckets(student_logits: Tensor, ids: Tensor, tau: float) -> Tensor:
    """[n, k + 1] student log-probs at tau on the teacher's k ids, then the log tail mass."""
    log_q = _log_probs(student_logits, tau)
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


def _log_probs(logits: Tensor, tau: float) -> Tensor:
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(z if tau == 1 else z / tau, dim=-1)


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
    log_q = _log_probs(student_logits, tau)
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


def sparse_from_logits(teacher_logits: Tensor, k: int, tau: float) -> SparseSignal:
    """The top-k signal of full teacher logits [n, V] (what `ddk cache-teacher` stores, before
    rounding): used by the cache builder and by tests as the exact reference."""
    log_p = _log_probs(teacher_logits, tau)
    logp, ids = log_p.topk(k, dim=-1)
    if k == log_p.shape[1]:
        log_tail = torch.full_like(logp[:, 0], -torch.inf)
    else:
        log_tail = torch.logsumexp(log_p.scatter(1, ids, -torch.inf), dim=-1)
    return SparseSignal(ids, logp, log_tail)


def sampled_from_logits(
    teacher_logits: Tensor,
    k: int,
    m: int,
    tau: float,
    uniforms: Tensor,
    *,
    power: float = PROPOSAL_POWER,
    logp_dtype: torch.dtype | None = None,
) -> tuple[SparseSignal, Tensor]:
    """The top-k head plus m systematic draws from the tail proposal pi ∝ p^power, from full
    teacher logits [n, V] and one uniform in [0, 1) per row.

    ``logp_dtype`` (the cache's float16) rounds the teacher's log-probs first: the head, the
    samples, the tail mass and the proposal are then all computed from the values the cache
    stores, so the estimator is unbiased for exactly what is read back. Returns the signal and
    the proposal's log normaliser [n] (``log sum_{j in T} p_j^power``: with the stored log-probs
    it gives the weights back, ``sample_log_weights``).
    """
    log_p = _log_probs(teacher_logits, tau)
    ids = log_p.topk(k, dim=-1).indices  # on the exact values: rounding makes ties
    if logp_dtype is not None:
        log_p = log_p.to(logp_dtype).to(log_p.dtype)
    tail = log_p.scatter(1, ids, -torch.inf)
    log_tail = torch.logsumexp(tail, dim=-1)
    sample_ids, log_norm = _systematic_draws(power * tail, m, uniforms)
    sample_logp = log_p.gather(1, sample_ids)
    logw = sample_log_weights(sample_logp, log_norm, m, power)
    signal = SparseSignal(ids, log_p.gather(1, ids), log_tail, sample_ids, sample_logp, logw)
    return signal, log_norm


def _systematic_draws(log_weights: Tensor, m: int, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """m systematic draws per row from the distribution ∝ exp(log_weights) [n, V]: the ids at
    CDF positions (s + u) / m. Returns (ids [n, m], log normaliser [n]); a row with no mass
    gets ids 0 (its weights are 0)."""
    log_norm = torch.logsumexp(log_weights, dim=-1)
    live = torch.isfinite(log_norm)
    shifted = log_weights - torch.where(live, log_norm, 0.0).unsqueeze(1)
    cdf = shifted.double().exp().cumsum(dim=-1)  # float64: no drift over a 150k vocabulary
    steps = torch.arange(m, dtype=torch.float64, device=cdf.device)
    points = (steps + uniforms.to(cdf.device, torch.float64).unsqueeze(1)) / m * cdf[:, -1:]
    # right=True: the first id whose CDF exceeds the point, so an id of probability 0 (a flat
    # step of the CDF) is never drawn; points stay below the last CDF value (u < 1).
    ids = torch.searchsorted(cdf, points, right=True).clamp_(max=cdf.shape[1] - 1)
    return torch.where(live.unsqueeze(1), ids, 0), log_norm


def sample_log_weights(sample_logp: Tensor, log_norm: Tensor, m: int, power: float) -> Tensor:
    """log w = log(1 / (m pi_t)) with log pi_t = power * log p_t - log_norm; -inf for the
    slots of a row with an empty tail (log_norm = -inf)."""
    live = torch.isfinite(log_norm).unsqueeze(1)
    log_pi = power * sample_logp - torch.where(live, log_norm.unsqueeze(1), 0.0)
    return torch.where(live, -math.log(m) - log_pi, -torch.inf)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def counter_uniforms(key: int, counters: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1) that are a pure function of (key, counter): SplitMix64 of
    key + counter * golden ratio, top 24 bits (so (m - 1 + u) / m < 1 holds in float64)."""
    x = np.uint64(key % (1 << 64)) + np.asarray(counters, dtype=np.uint64) * _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(40)).astype(np.float64) * 2.0**-24
