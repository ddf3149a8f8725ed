"""The teacher side of the sampled sparse signal: the top-k head plus m tail tokens drawn from
the teacher, with their importance weights (what `ddk cache-teacher` stores for
``teacher.sparse_estimator: sampled``; the estimator and its math: ``ddk.losses.sparse``).

The m tail ids are systematic draws from the proposal pi_j ∝ p_j^β over the tail (β =
PROPOSAL_POWER), one uniform per token; ``counter_uniforms`` makes those uniforms a pure
function of a key and a counter, so a resumed cache is byte-identical.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ddk.teacher.signals import SparseSignal, log_probs

PROPOSAL_POWER = 0.5
"""β of the tail proposal pi ∝ p^β (a choice, measured by benchmarks/bench_sparse_kl.py)."""


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
    log_p = log_probs(teacher_logits, tau)
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
