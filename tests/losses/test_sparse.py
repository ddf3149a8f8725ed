"""The top-k + tail-bucket divergence against the exact one on full teacher logits."""

from __future__ import annotations

import pytest
import torch

from ddk.losses import DIVERGENCES, fused_distill_loss, naive_distill_loss
from ddk.losses.sparse import student_buckets
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


@pytest.mark.parametrize("divergence", ["forward_kl", "js", "reverse_kl"])
@pytest.mark.parametrize("chunk", [1, 5, 100])
def test_chunked_equals_naive(divergence, chunk):
    hidden, weight, labels, dense = make(seed=1)
    sparse = sparse_of(dense, 5, 1.4)
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
