"""The cross-tokenizer divergence (`ddk.losses.crosstok`) inside the chunked loss."""

from __future__ import annotations

import pytest
import torch

from ddk.losses.chunked import fused_distill_loss, naive_distill_loss
from ddk.losses.crosstok import EXACT, MISMATCH, NONE, uld_distance
from ddk.losses.divergences import get_divergence
from ddk.teacher.signals import CrossSignal, DenseSignal

N, H, HT, VS, VT = 23, 8, 6, 17, 29


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VS, H, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, VS, (N,), generator=g)
    labels[3] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "js"])
def test_one_tokenizer_gives_todays_loss(divergence):
    """Identity: every row exact, the shared strings are every id: the same sums as the dense
    teacher, within 1e-5, and the same gradients."""
    hidden, weight, labels = _case()
    t_hidden = torch.randn(N, H, dtype=torch.float64)
    t_weight = torch.randn(VS, H, dtype=torch.float64)
    ids = torch.arange(VS)
    cross = CrossSignal(t_hidden, t_weight, torch.full((N,), EXACT, dtype=torch.int8), ids, ids, VS)
    kw = dict(vocab_size=VS, gamma=0.7, tau=1.5, divergence=divergence, chunk_tokens=5)
    a = fused_distill_loss(hidden, weight, labels, cross, **kw)
    ga = torch.autograd.grad(a.total, (hidden, weight))
    b = fused_distill_loss(hidden, weight, labels, DenseSignal(t_hidden, t_weight), **kw)
    gb = torch.autograd.grad(b.total, (hidden, weight))
    assert (
        abs(float(a.div - b.div)) < 1e-5 and abs(float(a.total.detach() - b.total.detach())) < 1e-5
    )
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def _cross_case(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mode = torch.randint(0, 3, (N,), generator=g).to(torch.int8)
    shared_s = torch.randperm(VS, generator=g)[:11]
    shared_t = torch.randperm(VT, generator=g)[:11]
    t_weight = torch.randn(VT + 3, HT, generator=g, dtype=torch.float64)  # padded head
    return CrossSignal(torch.randn(N, HT, generator=g, dtype=torch.float64), t_weight, mode,
                       shared_s, shared_t, VT)  # fmt: skip


@pytest.mark.parametrize("mismatch", ["uld", "skip"])
def test_chunked_equals_naive_and_the_formula(mismatch):
    hidden, weight, labels = _case()
    cross = _cross_case()
    kw = dict(vocab_size=VS, gamma=0.5, tau=2.0, divergence="forward_kl", cross_mismatch=mismatch)
    a = fused_distill_loss(hidden, weight, labels, cross, chunk_tokens=4, **kw)
    ga = torch.autograd.grad(a.total, (hidden, weight))
    b = naive_distill_loss(hidden, weight, labels, cross, **kw)
    gb = torch.autograd.grad(b.total, (hidden, weight))
    torch.testing.assert_close(a.total, b.total)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
    # The formula, row by row, written out plainly.
    zs, zt = hidden.detach() @ weight.detach().T, cross.hidden @ cross.head_weight[:VT].T
    kl, want = get_divergence("forward_kl"), 0.0
    for n in range(N):
        if labels[n] == -100 or cross.mode[n] == NONE:
            continue
        if cross.mode[n] == EXACT:
            p = torch.softmax(zt[n, cross.teacher_shared] / 2.0, -1)
            q = torch.softmax(zs[n, cross.student_shared] / 2.0, -1)
            want += float((p * (p.log() - q.log())).sum())
        elif mismatch == "uld":
            p = torch.softmax(zt[n] / 2.0, -1).sort(descending=True).values
            q = torch.softmax(zs[n] / 2.0, -1).sort(descending=True).values
            want += float((torch.nn.functional.pad(q, (0, VT - VS)) - p).abs().sum())
    assert abs(float(a.div) - want) < 1e-9
    assert kl is not None and (cross.mode == MISMATCH).any()


def test_uld_is_zero_for_a_permuted_copy_and_symmetric_in_padding():
    z = torch.randn(4, 7, dtype=torch.float64)
    assert torch.allclose(
        uld_distance(z, z[:, torch.randperm(7)], 1.0), torch.zeros(4, dtype=z.dtype)
    )
    wider = torch.cat([z, torch.full((4, 3), -torch.inf, dtype=z.dtype)], 1)
    assert torch.allclose(uld_distance(z, wider, 1.0), torch.zeros(4, dtype=z.dtype))
