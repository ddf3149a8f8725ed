"""A micro-batch whose rows belong to several teachers (`CompositeSignal`): the chunked loss
runs each part through its own signal's path on its rows and sums the sums."""

from __future__ import annotations

import pytest
import torch

from ddk.losses.chunked import fused_distill_loss, naive_distill_loss
from ddk.teacher.signals import CompositeSignal, CrossSignal, DenseSignal

V, H = 40, 8


def _signals(n_dense: int, n_cross: int, gen):
    """A dense teacher of the student's vocabulary and a cross teacher of another (30 ids,
    the first 25 shared in shuffled order), over n_dense and n_cross rows."""
    dense = DenseSignal(torch.randn(n_dense, 6, generator=gen, dtype=torch.float64),
                        torch.randn(V, 6, generator=gen, dtype=torch.float64))  # fmt: skip
    mode = torch.randint(0, 3, (n_cross,), generator=gen).to(torch.int8)
    cross = CrossSignal(
        torch.randn(n_cross, 5, generator=gen, dtype=torch.float64),
        torch.randn(30, 5, generator=gen, dtype=torch.float64), mode,
        torch.randperm(V, generator=gen)[:25], torch.arange(25), 30,
    )  # fmt: skip
    return dense, cross


def _student(n, gen):
    hidden = torch.randn(n, H, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[::5] = -100
    return hidden, weight, labels


KW = dict(vocab_size=V, gamma=0.7, tau=1.5, divergence="forward_kl", chunk_tokens=4)


@pytest.mark.parametrize("mismatch", ["uld", "skip"])
def test_each_row_gets_its_own_teacher(mismatch):
    gen = torch.Generator().manual_seed(0)
    n = 23
    hidden, weight, labels = _student(n, gen)
    perm = torch.randperm(n, generator=gen)
    a_rows, b_rows = perm[:9], perm[9:]
    dense, cross = _signals(9, 14, gen)
    composite = CompositeSignal(((a_rows, dense), (b_rows, cross)))
    kw = {**KW, "cross_mismatch": mismatch}
    results = []
    for loss in (fused_distill_loss, naive_distill_loss):
        out = loss(hidden, weight, labels, composite, **kw)
        grads = torch.autograd.grad(out.total, (hidden, weight))
        results.append((out, grads))
    # the per-part losses, each on its own rows, summed
    parts = [fused_distill_loss(hidden[r], weight, labels[r], s, **kw)
             for r, s in ((a_rows, dense), (b_rows, cross))]  # fmt: skip
    total = parts[0].total + parts[1].total
    results.append((parts, torch.autograd.grad(total, (hidden, weight))))
    (chunked, g_c), (naive, g_n), (_, g_p) = results
    assert chunked.tokens == naive.tokens == int((labels != -100).sum())
    assert float(chunked.div) > 0
    for field in ("total", "ce", "div"):
        by_parts = sum(float(getattr(p, field).detach()) for p in parts)
        assert abs(float(getattr(chunked, field)) - by_parts) < 1e-9
        assert abs(float(getattr(chunked, field)) - float(getattr(naive, field))) < 1e-9
    for x, y, z in zip(g_c, g_n, g_p):
        assert torch.allclose(x, y, atol=1e-9) and torch.allclose(x, z, atol=1e-9)


def test_parts_must_cover_every_row_once():
    gen = torch.Generator().manual_seed(1)
    hidden, weight, labels = _student(6, gen)
    dense, cross = _signals(3, 3, gen)
    overlapping = CompositeSignal(
        ((torch.tensor([0, 1, 2]), dense), (torch.tensor([2, 3, 4]), cross))
    )
    with pytest.raises(ValueError, match="every row exactly once"):
        fused_distill_loss(hidden, weight, labels, overlapping, **KW)
    two_rows, _ = _signals(2, 1, gen)
    short = CompositeSignal(((torch.tensor([0, 1, 2]), dense), (torch.tensor([3, 4, 5]), two_rows)))
    with pytest.raises(ValueError, match="teacher hidden"):
        fused_distill_loss(hidden, weight, labels, short, **KW)
