"""`distill.cross_mismatch: merge` (`ddk.losses.crosstok_merge`): GOLD's merged span
probabilities inside the chunked loss, against full-logit autograd and the formula."""

from __future__ import annotations

import pytest
import torch

from ddk.losses.chunked import FusedDistillLoss, fused_distill_loss, naive_distill_loss
from ddk.losses.crosstok import EXACT, NONE
from ddk.losses.crosstok_merge import MERGED, merged_uld
from ddk.losses.crosstok_sparse import SparseCrossRows, sparse_cross_divergence
from ddk.teacher.signals import CrossSignal, MergeGroups

N, H, HT, VS, VT, TAU = 20, 8, 6, 17, 29, 1.5
# (student rows of the span, number of teacher tokens in it): the loss sits on the last row
SPANS = [((2, 3, 4), 1), ((7,), 3), ((10, 11, 12, 13), 2), ((16, 17), 1)]


def _case(seed: int = 0, ignored: int | None = None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VS, H, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, VS, (N,), generator=g)
    if ignored is not None:
        labels[ignored] = -100
    mode = torch.zeros(N, dtype=torch.int8)
    mode[[0, 1, 5, 6, 8, 14, 18]] = EXACT
    row = torch.full((N,), -1, dtype=torch.long)
    t_row = []
    for rows, n_t in SPANS:
        row[list(rows)] = rows[-1]
        mode[rows[-1]] = MERGED
        t_row += [rows[-1]] * (n_t - 1)
    t_row = torch.tensor(t_row, dtype=torch.long)
    merge = MergeGroups(row, torch.randn(len(t_row), HT, generator=g, dtype=torch.float64),
                        torch.randint(0, VT, (len(t_row),), generator=g), t_row)  # fmt: skip
    shared_s, shared_t = torch.randperm(VS, generator=g)[:9], torch.randperm(VT, generator=g)[:9]
    t_weight = torch.randn(VT + 3, HT, generator=g, dtype=torch.float64)  # padded head
    cross = CrossSignal(torch.randn(N, HT, generator=g, dtype=torch.float64), t_weight, mode,
                        shared_s, shared_t, VT, merge=merge)  # fmt: skip
    return hidden, weight, labels, cross


@pytest.mark.parametrize("ignored", [None, 3])
@pytest.mark.parametrize("chunk", [3, 64])
def test_chunked_merge_equals_full_autograd(ignored, chunk):
    """Spans cut across chunks and a span with an ignored target (no loss): the chunked
    pre-pass plus gradient carriers give full autograd's sums and gradients."""
    hidden, weight, labels, cross = _case(ignored=ignored)
    kw = dict(vocab_size=VS, gamma=0.7, tau=TAU, divergence="forward_kl", cross_mismatch="merge")
    a = fused_distill_loss(hidden, weight, labels, cross, chunk_tokens=chunk, **kw)
    ga = torch.autograd.grad(a.total, (hidden, weight))
    b = naive_distill_loss(hidden, weight, labels, cross, **kw)
    gb = torch.autograd.grad(b.total, (hidden, weight))
    torch.testing.assert_close(a.total, b.total)
    torch.testing.assert_close(a.div, b.div)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
    # the earlier rows of a span get a gradient from the merge term alone (through A)
    skip = fused_distill_loss(hidden, weight, labels, cross, chunk_tokens=chunk,
                              **{**kw, "cross_mismatch": "skip"})  # fmt: skip
    g_skip = torch.autograd.grad(skip.total, hidden)[0]
    moved = (ga[0] - g_skip).abs().sum(-1) > 1e-9
    assert moved[[10, 11, 12, 16]].all() and not moved[[0, 1, 5, 9]].any()
    assert moved[[2, 3]].all() == (ignored is None)


def test_merge_is_the_formula():
    """MERGE of one span written out: the chain products along the text, then the sorted L1."""
    hidden, weight, labels, cross = _case()
    zs = hidden.detach() @ weight.detach().T
    head = cross.head_weight[:VT]
    q = torch.softmax(zs / TAU, -1)
    rows, last = (10, 11, 12, 13), 13
    a = q[10, labels[10]] * q[11, labels[11]] * q[12, labels[12]]
    t_prefix = cross.merge.teacher_hidden[cross.merge.teacher_row == last] @ head.T
    t_ids = cross.merge.teacher_ids[cross.merge.teacher_row == last]
    b = torch.softmax(t_prefix / TAU, -1)[0, t_ids[0]]
    q_span = (a * q[last]).sort(descending=True).values
    p_span = (b * torch.softmax(cross.hidden[last] @ head.T / TAU, -1)).sort(descending=True).values
    want = float((torch.nn.functional.pad(q_span, (0, VT - VS)) - p_span).abs().sum())
    only = torch.full((N,), -100)
    only[list(rows)] = labels[list(rows)]
    got = naive_distill_loss(hidden, weight, only, cross, vocab_size=VS, gamma=1.0, tau=TAU,
                             divergence="forward_kl", cross_mismatch="merge")  # fmt: skip
    assert abs(float(got.div) - want) < 1e-9
    assert cross.mode[last] == MERGED and not (cross.mode[list(rows[:-1])] != NONE).any()


def test_merged_uld_of_equal_span_distributions_is_zero():
    """Two sides that put the same mass on the span's continuations, in other vocabularies and
    split differently (prefix probabilities 0.5 vs 0.25 · 2), are at distance 0."""
    z = torch.randn(3, 7, dtype=torch.float64)
    wider = torch.cat([z[:, torch.randperm(7)], torch.full((3, 4), -torch.inf, dtype=z.dtype)], 1)
    half = torch.full((3,), 0.5, dtype=z.dtype).log()
    d = merged_uld(z, wider + torch.log(torch.tensor(2.0)), half, half - 0.0, 1.0)
    assert torch.allclose(d, torch.zeros(3, dtype=z.dtype))
    assert (merged_uld(z, wider, half, half + 0.1, 1.0) > 0).all()


def test_merge_needs_the_spans():
    hidden, weight, labels, cross = _case()
    loss = FusedDistillLoss(VS, cross_mismatch="merge")
    with pytest.raises(ValueError, match="merge spans"):
        loss(hidden, weight, labels, cross._replace(merge=None))


def test_sparse_teacher_rows_refuse_merge():
    """A cache's sparse rows hold no span-prefix probabilities: merge is refused, not skipped."""
    rows = SparseCrossRows(*(torch.zeros(2, 1), torch.zeros(2, 1)), torch.zeros(2),
                           torch.zeros(2), torch.zeros(2, dtype=torch.int8))  # fmt: skip
    with pytest.raises(ValueError, match="live teacher"):
        sparse_cross_divergence(torch.zeros(2, VS), rows, torch.arange(3), torch.arange(3),
                                None, 1.0, 0.0, "merge")  # fmt: skip
