"""The sparse-teacher estimators (top-k buckets; top-k head + sampled tail) against the exact
divergence on full teacher logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddk.losses import DIVERGENCES, fused_distill_loss, naive_distill_loss
from ddk.losses.sparse import sparse_divergence, student_buckets
from ddk.teacher.sampling import (
    PROPOSAL_POWER,
    counter_uniforms,
    sample_log_weights,
    sampled_from_logits,
)
from ddk.teacher.signals import DenseSignal, SparseSignal, sparse_from_logits

V = 23


def make(n=13, h=8, ht=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).requires_grad_(True)
    weight = (0.7 * torch.randn(V + 3, h, generator=g, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[:2] = -100
    t_hidden = torch.randn(n, ht, generator=g, dtype=torch.float64)
    t_weight = torch.randn(V + 1, ht, generator=g, dtype=torch.float64)
    return hidden, weight, labels, DenseSignal(t_hidden, t_weight)


def sparse_of(dense: DenseSignal, k: int, tau: float) -> SparseSignal:
    logits = (dense.hidden @ dense.head_weight.T)[:, :V]
    return sparse_from_logits(logits, k, tau)


def loss_and_grads(fn, hidden, weight, labels, teacher, divergence="forward_kl", **kw):
    settings = dict(vocab_size=V, gamma=0.6, tau=1.4, divergence=divergence, skew_lambda=0.2)
    settings.update(kw)
    out = fn(hidden, weight, labels, teacher, **settings)
    return out, torch.autograd.grad(out.total, [hidden, weight])


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_k_equal_vocab_is_exact(divergence):
    hidden, weight, labels, dense = make()
    exact, g_exact = loss_and_grads(fused_distill_loss, hidden, weight, labels, dense, divergence)
    sparse = sparse_of(dense, V, 1.4)
    assert torch.isneginf(sparse.log_tail).all()
    out, grads = loss_and_grads(
        fused_distill_loss, hidden, weight, labels, sparse, divergence, chunk_tokens=4
    )
    torch.testing.assert_close(out.div, exact.div, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.total, exact.total, rtol=1e-9, atol=1e-9)
    for g, ge in zip(grads, g_exact, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, ge, rtol=1e-8, atol=1e-9)


def test_error_shrinks_as_k_grows():
    hidden, weight, labels, dense = make(n=40, seed=3)
    exact, _ = loss_and_grads(fused_distill_loss, hidden, weight, labels, dense)
    errors = []
    for k in (1, 2, 4, 8, 16, 22, V):
        out, _ = loss_and_grads(
            fused_distill_loss, hidden, weight, labels, sparse_of(dense, k, 1.4)
        )
        # Coarsening into buckets can only lose divergence: a lower bound of the exact KL.
        assert out.div <= exact.div + 1e-12
        errors.append(float(exact.div - out.div))
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:])), errors
    # k = V - 1 leaves one token in the tail bucket: nothing is lost either.
    assert errors[0] > 10 * errors[-3] > 0 and abs(errors[-2]) < 1e-9 and abs(errors[-1]) < 1e-9


@pytest.mark.parametrize("estimator", ["topk", "sampled"])
@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("chunk", [1, 5, 100])
def test_chunked_equals_naive(estimator, divergence, chunk):
    hidden, weight, labels, dense = make(seed=1)
    if estimator == "topk":
        sparse = sparse_of(dense, 5, 1.4)
    else:
        sparse = sampled_of(dense, 5, 1.4, seed=3)
    fused = loss_and_grads(
        fused_distill_loss, hidden, weight, labels, sparse, divergence, chunk_tokens=chunk
    )
    naive = loss_and_grads(naive_distill_loss, hidden, weight, labels, sparse, divergence)
    torch.testing.assert_close(fused[0].total, naive[0].total, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused[0].div, naive[0].div, rtol=1e-10, atol=1e-10)
    for a, b in zip(fused[1], naive[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_forward_kl_formula():
    """The docstring's formula, written out naively for one row."""
    g = torch.Generator().manual_seed(7)
    z_s, z_t = torch.randn(1, V, generator=g), torch.randn(1, V, generator=g)
    tau, k = 0.8, 4
    sig = sparse_from_logits(z_t, k, tau)
    p = torch.softmax(z_t / tau, -1)[0].double()
    q = torch.softmax(z_s / tau, -1)[0].double()
    S = sig.ids[0].tolist()
    rest = [j for j in range(V) if j not in S]
    p_tail, q_tail = p[rest].sum(), q[rest].sum()
    ref = sum(p[i] * (p[i].log() - q[i].log()) for i in S) + p_tail * (p_tail.log() - q_tail.log())
    got = DIVERGENCES["forward_kl"](
        student_buckets(z_s, sig.ids, tau),
        torch.cat([sig.logp, sig.log_tail[:, None]], 1),
        1.0,
        0.0,
    )
    torch.testing.assert_close(got[0].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sig.log_tail[0].double().exp(), p_tail, rtol=1e-5, atol=1e-7)


def test_bad_sparse_shapes_refused():
    hidden, weight, labels, dense = make()
    sparse = sparse_of(dense, 4, 1.0)
    short = SparseSignal(sparse.ids[:-1], sparse.logp[:-1], sparse.log_tail[:-1])
    with pytest.raises(ValueError, match="sparse teacher"):
        loss_and_grads(fused_distill_loss, hidden, weight, labels, short)


def test_dense_teacher_transform_matches_sparse_of_transformed_logits():
    """A teacher with its own logit transform (a softcap): the dense path applies it per chunk,
    the same as a k = V sparse signal built from the transformed logits."""
    hidden, weight, labels, dense = make(seed=4)

    def softcap(z):
        return 2.0 * torch.tanh(z / 2.0)

    capped = dense._replace(transform=softcap)
    out, grads = loss_and_grads(fused_distill_loss, hidden, weight, labels, capped, chunk_tokens=3)
    naive, n_grads = loss_and_grads(naive_distill_loss, hidden, weight, labels, capped)
    logits = softcap((dense.hidden @ dense.head_weight.T)[:, :V])
    sparse, s_grads = loss_and_grads(
        fused_distill_loss, hidden, weight, labels, sparse_from_logits(logits, V, 1.4)
    )
    plain, _ = loss_and_grads(fused_distill_loss, hidden, weight, labels, dense)
    for other, other_grads in ((naive, n_grads), (sparse, s_grads)):
        torch.testing.assert_close(out.div, other.div, rtol=1e-9, atol=1e-9)
        for a, b in zip(grads, other_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    assert abs(float(out.div - plain.div)) > 1e-3  # the transform did change the target


# ---------------------------------------------------------------------------------- sampled
M = 4  # tail samples per row in these tests


def uniforms(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sampled_of(dense: DenseSignal, k: int, tau: float, seed: int = 0, **kw) -> SparseSignal:
    logits = (dense.hidden @ dense.head_weight.T)[:, :V]
    return sampled_from_logits(logits, k, M, tau, uniforms(logits.shape[0], seed), **kw)[0]


def replicate(hidden, labels, dense, reps):
    """``reps`` copies of every row: one loss call then averages ``reps`` independent draws."""
    return (
        hidden.detach().repeat(reps, 1).requires_grad_(True),
        labels.repeat(reps),
        dense._replace(hidden=dense.hidden.repeat(reps, 1)),
    )


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_sampled_k_equal_vocab_is_exact(divergence):
    hidden, weight, labels, dense = make()
    exact, g_exact = loss_and_grads(fused_distill_loss, hidden, weight, labels, dense, divergence)
    sparse = sampled_of(dense, V, 1.4)
    assert torch.isneginf(sparse.log_tail).all() and torch.isneginf(sparse.sample_logw).all()
    out, grads = loss_and_grads(
        fused_distill_loss, hidden, weight, labels, sparse, divergence, chunk_tokens=4
    )
    torch.testing.assert_close(out.div, exact.div, rtol=1e-9, atol=1e-9)
    for g, ge in zip(grads, g_exact, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, ge, rtol=1e-8, atol=1e-9)


def _mean_and_error(draws: list[torch.Tensor], exact: torch.Tensor) -> tuple[float, float]:
    """(distance of the draws' mean from ``exact``, its standard error), both as norms."""
    stacked = torch.stack([d.flatten() for d in draws])
    n = stacked.shape[0]
    err = (stacked.mean(0) - exact.flatten()).norm()
    se = (stacked.var(0).sum() / n).sqrt()
    return float(err), float(se)


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_sampled_is_unbiased_in_value_and_gradient(divergence, tau):
    """The mean over seeds of the loss and of its gradients (w.r.t. the student's hidden states
    and LM head) is the dense one; masked rows take no part. The same check refuses top-k."""
    hidden, weight, labels, dense = make(seed=5)
    exact, g_exact = loss_and_grads(
        fused_distill_loss, hidden, weight, labels, dense, divergence, tau=tau
    )
    reps = 200
    h, lab, _ = replicate(hidden, labels, dense, reps)
    logits = (dense.hidden @ dense.head_weight.T)[:, :V].repeat(reps, 1)
    values, grads_h, grads_w = [], [], []
    for seed in range(16):  # 16 batch means of 200 draws each
        sparse, _ = sampled_from_logits(logits, 3, M, tau, uniforms(logits.shape[0], seed))
        out, (gh, gw) = loss_and_grads(
            fused_distill_loss, h, weight, lab, sparse, divergence, tau=tau, chunk_tokens=512
        )
        values.append(out.div / reps)
        grads_h.append(gh.view(reps, *hidden.shape).mean(0))
        grads_w.append(gw / reps)
    for draws, ref in ((values, exact.div), (grads_h, g_exact[0]), (grads_w, g_exact[1])):
        err, se = _mean_and_error(draws, ref)
        # For an unbiased estimator err ~ se (a norm over a few hundred entries: err^2 / se^2 is
        # about chi-square over its dimension); a bias 4 standard errors large fails.
        assert err < 4 * se + 1e-12, (err, se, float(ref.norm()))
        assert se < 0.1 * float(ref.norm())  # a meaningful check: the noise is small
    topk, g_topk = loss_and_grads(
        fused_distill_loss, hidden, weight, labels, sparse_of(dense, 3, tau), divergence, tau=tau
    )
    assert abs(float(topk.div - exact.div)) > 4 * _mean_and_error(values, exact.div)[1]
    assert float((g_topk[1] - g_exact[1]).norm()) > 4 * _mean_and_error(grads_w, g_exact[1])[1]


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_sampled_formula(divergence):
    """The docstring's estimator written out for one row: head + weighted samples, with the
    tangent control around (P, Q) for reverse KL (a = -Q / P, b = log(Q / P) + 1)."""
    g = torch.Generator().manual_seed(11)
    z_s, z_t = torch.randn(1, V, generator=g), torch.randn(1, V, generator=g)
    tau, k, m = 0.8, 4, 6
    sig, _ = sampled_from_logits(z_t, k, m, tau, torch.tensor([0.37], dtype=torch.float64))
    p = torch.softmax(z_t.double() / tau, -1)[0]
    q = torch.softmax(z_s.double() / tau, -1)[0]
    S = sig.ids[0].tolist()
    tail = [j for j in range(V) if j not in S]
    P, Q = p[tail].sum(), q[tail].sum()
    pi = {j: float(p[j].sqrt() / p[tail].sqrt().sum()) for j in tail}
    draws = sig.sample_ids[0].tolist()
    assert not set(draws) & set(S)

    def f(pj, qj):
        return pj * (pj / qj).log() if divergence == "forward_kl" else qj * (qj / pj).log()

    ref = sum(f(p[i], q[i]) for i in S)
    if divergence == "forward_kl":
        ref = ref + sum(f(p[t], q[t]) / (m * pi[t]) for t in draws)
    else:
        a, b = -Q / P, (Q / P).log() + 1
        ref = ref + sum((f(p[t], q[t]) - a * p[t] - b * q[t]) / (m * pi[t]) for t in draws)
        ref = ref + a * P + b * Q
    got = sparse_divergence(z_s.double(), sig, tau, divergence, 0.0)
    torch.testing.assert_close(got[0], ref, rtol=1e-6, atol=1e-8)
    weights = 1 / (m * torch.tensor([pi[t] for t in draws]))
    torch.testing.assert_close(sig.sample_logw[0].exp(), weights, rtol=1e-5, atol=0)


def test_draws_follow_the_proposal_and_skip_the_head_and_zeros():
    """Systematic draws: each slot is a tail id of positive probability, and over u the
    expected count of an id is m pi_j exactly; an id with pi_j >= 1/m is always drawn."""
    g = torch.Generator().manual_seed(2)
    z = 3 * torch.randn(1, V, generator=g, dtype=torch.float64)
    z[0, 5] = z[0, 9] = -torch.inf
    k, m, grid = 3, 5, 4000
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    sig, _ = sampled_from_logits(z.repeat(grid, 1), k, m, 1.0, u)
    head = set(sig.ids[0].tolist())
    counts = torch.bincount(sig.sample_ids.flatten(), minlength=V).double() / grid
    p = torch.softmax(z[0], -1)
    tail = torch.tensor([j not in head for j in range(V)])
    pi = torch.where(tail, p.sqrt(), 0.0)
    pi = pi / pi.sum()
    torch.testing.assert_close(counts, m * pi, rtol=0, atol=2.0 / grid)
    assert counts[5] == counts[9] == 0 and counts[list(head)].sum() == 0
    assert (
        (sig.sample_ids[:, None, :] == torch.nonzero(m * pi >= 1)[:, 0][None, :, None])
        .any(-1)
        .all()
    )


def test_rounded_signal_is_self_consistent():
    """With float16 log-probs (the cache's), the stored values give the weights and tail back."""
    hidden, weight, labels, dense = make(n=9, seed=6)
    logits = (dense.hidden @ dense.head_weight.T)[:, :V].float()
    sig, log_norm = sampled_from_logits(logits, 4, M, 1.3, uniforms(9, 0), logp_dtype=torch.float16)
    for t in (sig.logp, sig.sample_logp):
        assert torch.equal(t, t.half().float())
    w = sample_log_weights(sig.sample_logp.half().float(), log_norm.float(), M, PROPOSAL_POWER)
    torch.testing.assert_close(w, sig.sample_logw, rtol=0, atol=1e-6)
    log_p = torch.log_softmax(logits / 1.3, -1).half().float()
    tail = torch.logsumexp(log_p.scatter(1, sig.ids, -torch.inf), -1)
    torch.testing.assert_close(sig.log_tail, tail)


def test_counter_uniforms_are_a_pure_function():
    a = counter_uniforms(123, np.arange(20000))
    assert a.dtype == np.float64 and (a >= 0).all() and (a < 1).all()
    assert np.array_equal(a, counter_uniforms(123, np.arange(20000)))
    assert np.array_equal(a[7:9], counter_uniforms(123, np.array([7, 8])))
    assert not np.array_equal(a, counter_uniforms(124, np.arange(20000)))
    assert abs(a.mean() - 0.5) < 0.01 and abs((a < 0.1).mean() - 0.1) < 0.01


def test_bad_sample_shapes_refused():
    hidden, weight, labels, dense = make()
    sparse = sampled_of(dense, 4, 1.0)
    with pytest.raises(ValueError, match="sample_ids, sample_logp, sample_logw"):
        loss_and_grads(
            fused_distill_loss, hidden, weight, labels, sparse._replace(sample_logw=None)
        )
    with pytest.raises(ValueError, match="sample_ids, sample_logp, sample_logw"):
        loss_and_grads(
            fused_distill_loss, hidden, weight, labels,
            sparse._replace(sample_logp=sparse.sample_logp[:, :2]),
        )  # fmt: skip
