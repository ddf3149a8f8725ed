"""The cross-tokenizer divergence from sparse (top-k) teacher rows (`ddk.losses.crosstok_sparse`)
against the online one (`ddk.losses.crosstok`) it stands in for."""

from __future__ import annotations

import pytest
import torch

from ddk.losses.chunked import fused_distill_loss, naive_distill_loss
from ddk.losses.crosstok import cross_divergence
from ddk.losses.crosstok_sparse import (
    SparseCrossRows,
    shared_index,
    sparse_cross_divergence,
    teacher_shared_mass,
)
from ddk.losses.divergences import DIVERGENCES
from ddk.teacher.signals import CrossSignal, SparseCrossSignal, log_probs


def sparse_rows(z_t, mode, teacher_shared, k, tau) -> SparseCrossRows:
    """What a cache of the teacher's rows `z_t` at top-k would hold."""
    log_p = log_probs(z_t, tau)
    logp, ids = log_p.topk(k, dim=-1)
    rest = log_p.scatter(1, ids, float("-inf")).logsumexp(-1)
    return SparseCrossRows(ids, logp, rest, teacher_shared_mass(z_t, teacher_shared, tau), mode)


def online_and_sparse(z_s, z_t, mode, s_shared, t_shared, k, divergence, tau, mismatch="uld"):
    fn = DIVERGENCES[divergence]
    signal = CrossSignal(None, None, mode, s_shared, t_shared, z_t.shape[1])
    online = cross_divergence(z_s, z_t, signal, fn, tau, 0.1, mismatch)
    rows = sparse_rows(z_t, mode, t_shared, k, tau)
    index = shared_index(t_shared, z_t.shape[1])
    return online, sparse_cross_divergence(z_s, rows, s_shared, index, fn, tau, 0.1, mismatch)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    n, v_s, v_t, m = 64, 50, 40, 30
    z_s = torch.randn(n, v_s, generator=g, dtype=torch.float64) * 2
    z_t = torch.randn(n, v_t, generator=g, dtype=torch.float64) * 2
    mode = torch.randint(0, 3, (n,), generator=g).to(torch.int8)
    s_shared = torch.randperm(v_s, generator=g)[:m]
    t_shared = torch.randperm(v_t, generator=g)[:m]
    return z_s, z_t, mode, s_shared, t_shared


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_a_full_row_gives_the_online_loss(pair, divergence, tau):
    """k = the teacher's vocabulary: the sparse rows hold everything, the loss is the online one
    (exact KL rows and ULD rows), values and gradients."""
    z_s, z_t, mode, s_shared, t_shared = pair
    z_s = z_s.clone().requires_grad_()
    online, sparse = online_and_sparse(z_s, z_t, mode, s_shared, t_shared, z_t.shape[1],
                                       divergence, tau)  # fmt: skip
    torch.testing.assert_close(sparse, online, atol=1e-9, rtol=1e-9)
    (g_online,) = torch.autograd.grad(online.sum(), z_s)
    (g_sparse,) = torch.autograd.grad(sparse.sum(), z_s)
    torch.testing.assert_close(g_sparse, g_online, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_top_k_exact_rows_bound_the_online_loss_from_below(pair, divergence):
    """Fewer than V_T entries: each exact row's loss is at most the online one (coarsening) and
    the total grows toward it with k; rows without a teacher position stay 0."""
    z_s, z_t, mode, s_shared, t_shared = pair
    online, _ = online_and_sparse(z_s, z_t, mode, s_shared, t_shared, 4, divergence, 1.0)
    exact = mode == 1
    totals = []
    for k in (4, 16, 32):
        _, sparse = online_and_sparse(z_s, z_t, mode, s_shared, t_shared, k, divergence, 1.0)
        assert (sparse[exact] <= online[exact] + 1e-12).all()
        assert (sparse[mode == 0] == 0).all()
        totals.append(float(sparse[exact].sum()))
    assert totals[0] < totals[1] < totals[2] < float(online[exact].sum())


def test_uld_rows_are_exact_for_a_teacher_with_a_flat_tail(pair):
    """A teacher whose distribution is flat past its top k: ULD from top-k rows is the online
    ULD (the tail is spread evenly over the teacher's other ranks)."""
    z_s, z_t, _, s_shared, t_shared = pair
    k = 8
    top = z_t.topk(k, dim=-1).indices
    flat = torch.full_like(z_t, -3.0).scatter(1, top, z_t.gather(1, top).clamp(min=-2.0))
    mode = torch.full((z_t.shape[0],), 2, dtype=torch.int8)
    online, sparse = online_and_sparse(z_s, flat, mode, s_shared, t_shared, k, "forward_kl", 1.0)
    torch.testing.assert_close(sparse, online, atol=1e-9, rtol=1e-9)
    _, sparse = online_and_sparse(z_s, z_t, mode, s_shared, t_shared, k, "forward_kl", 1.0)
    assert not torch.allclose(sparse, online)  # a teacher with a shaped tail: an estimate


def test_skip_leaves_mismatched_rows_out(pair):
    z_s, z_t, mode, s_shared, t_shared = pair
    online, sparse = online_and_sparse(z_s, z_t, mode, s_shared, t_shared, 40, "forward_kl", 1.0,
                                       mismatch="skip")  # fmt: skip
    assert (sparse[mode != 1] == 0).all()
    torch.testing.assert_close(sparse, online, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("mismatch", ["uld", "skip"])
def test_the_chunked_loss_takes_a_cached_cross_signal(pair, mismatch):
    """`SparseCrossSignal` (what an offline cross-tokenizer cache hands the loss) through the
    chunked loss, chunk by chunk, equals the plain reference and the per-row loss above
    (values and gradients)."""
    z_s, z_t, mode, s_shared, t_shared = pair
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(z_s.shape[0], 12, generator=g, dtype=torch.float64)
    head = torch.randn(z_s.shape[1] + 3, 12, generator=g, dtype=torch.float64)  # padded head
    labels = torch.randint(0, z_s.shape[1], (z_s.shape[0],), generator=g)
    labels[::7] = -100
    rows = sparse_rows(z_t, mode, t_shared, 8, 1.0)
    signal = SparseCrossSignal(*rows, s_shared, shared_index(t_shared, z_t.shape[1]))
    kw = dict(vocab_size=z_s.shape[1], gamma=0.5, tau=1.0, divergence="forward_kl",
              cross_mismatch=mismatch)  # fmt: skip
    out = []
    for loss, extra in ((fused_distill_loss, {"chunk_tokens": 5}), (naive_distill_loss, {})):
        h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
        sums = loss(h, w, labels, signal, **kw, **extra)
        out.append((sums, *torch.autograd.grad(sums.total, (h, w))))
    (a, ga_h, ga_w), (b, gb_h, gb_w) = out
    torch.testing.assert_close(a.total, b.total)
    torch.testing.assert_close(ga_h, gb_h)
    torch.testing.assert_close(ga_w, gb_w)
    logits = (hidden @ head.T)[:, : z_s.shape[1]]
    per_row = sparse_cross_divergence(logits, rows, s_shared, signal.shared_index,
                                      DIVERGENCES["forward_kl"], 1.0, 0.1, mismatch)  # fmt: skip
    torch.testing.assert_close(a.div, per_row[labels != -100].sum())
    assert float(a.div) > 0
