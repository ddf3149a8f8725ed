"""The chunked LM-head + CE + γ·divergence sum against the full-logits reference."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from ddk.config import DistillSection
from ddk.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    FusedDistillLoss,
    chunked_ce_sum,
    fused_distill_loss,
    loss_from_config,
    naive_distill_loss,
)
from ddk.teacher.signals import DenseSignal

ALL = [*sorted(DIVERGENCES), "none"]


@dataclass
class Batch:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    t_hidden: torch.Tensor
    t_weight: torch.Tensor
    t_bias: torch.Tensor | None
    vocab: int

    @property
    def teacher(self) -> DenseSignal | None:
        if self.t_hidden is None:
            return None
        return DenseSignal(self.t_hidden, self.t_weight, self.t_bias)

    def leaves(self) -> list[torch.Tensor]:
        return [x for x in (self.hidden, self.weight, self.bias) if x is not None]


def make_batch(
    n: int = 11,
    h: int = 8,
    ht: int = 12,
    vocab: int = 23,
    v_student: int = 26,
    v_teacher: int = 25,
    bias: bool = True,
    ignore: float = 0.3,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> Batch:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore] = IGNORE_INDEX
    return Batch(
        hidden=randn(n, h).requires_grad_(True),
        weight=randn(v_student, h, scale=0.7).requires_grad_(True),
        bias=randn(v_student, scale=0.5).requires_grad_(True) if bias else None,
        labels=labels,
        t_hidden=randn(n, ht),
        t_weight=randn(v_teacher, ht, scale=0.7),
        t_bias=randn(v_teacher, scale=0.5) if bias else None,
        vocab=vocab,
    )


def run(fn, b: Batch, divergence: str, **kw):
    settings = dict(vocab_size=b.vocab, gamma=0.7, tau=1.3, divergence=divergence, skew_lambda=0.2)
    settings.update(kw)
    out = fn(
        b.hidden,
        b.weight,
        b.labels,
        b.teacher,
        student_head_bias=b.bias,
        **settings,
    )
    grads = torch.autograd.grad(out.total, b.leaves(), allow_unused=True)
    return out, grads


def assert_same(fused, naive, rtol=1e-10, atol=1e-10):
    (f_out, f_grads), (n_out, n_grads) = fused, naive
    assert f_out.tokens == n_out.tokens
    torch.testing.assert_close(f_out.total, n_out.total, rtol=rtol, atol=atol)
    torch.testing.assert_close(f_out.ce, n_out.ce, rtol=rtol, atol=atol)
    torch.testing.assert_close(f_out.div, n_out.div, rtol=rtol, atol=atol)
    for fg, ng in zip(f_grads, n_grads, strict=True):
        torch.testing.assert_close(fg, ng, rtol=rtol, atol=atol)


@pytest.mark.parametrize("divergence", ALL)
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_chunked_equals_naive(divergence, chunk):
    b = make_batch()  # N = 11: not a multiple of 4; chunk 100 > N
    fused = run(fused_distill_loss, b, divergence, chunk_tokens=chunk)
    naive = run(naive_distill_loss, b, divergence)
    assert_same(fused, naive)
    out = fused[0]
    assert out.total.requires_grad and not out.ce.requires_grad and not out.div.requires_grad
    assert out.tokens == int((b.labels != IGNORE_INDEX).sum())
    if divergence == "none":
        assert out.div.item() == 0.0
    else:
        assert out.div.item() > 0.0
        torch.testing.assert_close(out.total, out.ce + 0.7 * out.div)


@pytest.mark.parametrize("divergence", ["forward_kl", "js"])
def test_without_bias_and_no_trimming(divergence):
    b = make_batch(n=9, bias=False, v_student=23, v_teacher=23, ignore=0.0, seed=3)
    assert_same(
        run(fused_distill_loss, b, divergence, chunk_tokens=2),
        run(naive_distill_loss, b, divergence),
    )


def test_vocab_padding_rows_get_zero_gradient():
    b = make_batch(vocab=20, v_student=26)
    _, (_, grad_w, grad_b) = run(fused_distill_loss, b, "forward_kl", chunk_tokens=3)
    assert grad_w.shape == b.weight.shape and grad_b.shape == b.bias.shape
    assert (grad_w[20:] == 0).all() and (grad_b[20:] == 0).all()
    assert (grad_w[:20] != 0).any()


def test_ignored_rows_get_zero_gradient():
    b = make_batch(ignore=0.5, seed=1)
    _, (grad_h, _, _) = run(fused_distill_loss, b, "reverse_kl", chunk_tokens=3)
    ignored = b.labels == IGNORE_INDEX
    assert ignored.any() and (~ignored).any()
    assert (grad_h[ignored] == 0).all()
    assert (grad_h[~ignored].abs().sum(-1) > 0).all()


def test_ignored_rows_do_not_reach_the_loss():
    b = make_batch(ignore=0.5, seed=1)
    ref = run(fused_distill_loss, b, "js", chunk_tokens=3)[0]
    ignored = b.labels == IGNORE_INDEX
    with torch.no_grad():
        b.hidden[ignored] = float("nan")
    b.t_hidden[ignored] = float("nan")
    out = run(fused_distill_loss, b, "js", chunk_tokens=3)[0]
    torch.testing.assert_close(out.total, ref.total)


@pytest.mark.parametrize(
    "kw",
    [dict(divergence="none"), dict(gamma=0.0), dict(teacher=None)],
    ids=["none", "gamma0", "no-teacher"],
)
def test_teacher_skipped(kw):
    """With no divergence term the teacher is never touched: NaN teacher inputs do no harm."""
    b = make_batch()
    b.t_hidden = torch.full_like(b.t_hidden, float("nan"))
    if kw.pop("teacher", "keep") is None:
        b.t_hidden = b.t_weight = b.t_bias = None
    kw.setdefault("divergence", "forward_kl")
    out, grads = run(fused_distill_loss, b, chunk_tokens=4, **kw)
    ce_only, ce_grads = run(naive_distill_loss, b, "none")
    assert out.div.item() == 0.0
    assert_same((out, grads), (ce_only, ce_grads))
    torch.testing.assert_close(
        out.ce, F.cross_entropy(b.hidden @ b.weight[:23].T + b.bias[:23], b.labels, reduction="sum")
    )


def test_teacher_gets_no_gradient():
    b = make_batch()
    b.t_hidden.requires_grad_(True)
    b.t_weight.requires_grad_(True)
    out = fused_distill_loss(
        b.hidden, b.weight, b.labels, b.teacher,
        vocab_size=b.vocab, gamma=0.5, tau=1.0, divergence="forward_kl", chunk_tokens=4,
    )  # fmt: skip
    out.total.backward()
    assert b.t_hidden.grad is None and b.t_weight.grad is None
    assert b.hidden.grad is not None and b.weight.grad is not None


def test_grad_output_scaling_and_frozen_head():
    b = make_batch()
    b.weight.requires_grad_(False)
    kw = dict(vocab_size=b.vocab, gamma=0.3, tau=2.0, divergence="skew_kl", chunk_tokens=5)
    fused = fused_distill_loss(b.hidden, b.weight, b.labels, b.teacher, **kw)
    naive = naive_distill_loss(b.hidden, b.weight, b.labels, b.teacher, **kw)
    (g_fused,) = torch.autograd.grad(fused.total * 0.37, [b.hidden])
    (g_naive,) = torch.autograd.grad(naive.total * 0.37, [b.hidden])
    torch.testing.assert_close(g_fused, g_naive)


@pytest.mark.parametrize("divergence", ["forward_kl", "none"])
def test_all_ignored_gives_zero(divergence):
    b = make_batch(ignore=1.0)
    assert (b.labels == IGNORE_INDEX).all()
    out, grads = run(fused_distill_loss, b, divergence, chunk_tokens=4)
    assert out.tokens == 0
    assert out.total.item() == 0.0 and out.ce.item() == 0.0 and out.div.item() == 0.0
    for g in grads:
        assert torch.isfinite(g).all() and (g == 0).all()
    naive_out, _ = run(naive_distill_loss, b, divergence)
    assert naive_out.total.item() == 0.0


@pytest.mark.parametrize("divergence", ["forward_kl", "skew_reverse_kl", "none"])
def test_halves_sum_to_whole(divergence):
    """Gradient accumulation: sums (and their gradients) over two halves add up to the whole."""
    b = make_batch(n=13, seed=5)
    kw = dict(vocab_size=b.vocab, gamma=0.4, tau=1.1, divergence=divergence, chunk_tokens=3)
    kw.update(student_head_bias=b.bias)
    whole = fused_distill_loss(b.hidden, b.weight, b.labels, b.teacher, **kw)
    g_whole = torch.autograd.grad(whole.total, b.leaves())
    parts = [
        fused_distill_loss(
            b.hidden[s], b.weight, b.labels[s], b.teacher._replace(hidden=b.t_hidden[s]), **kw
        )
        for s in (slice(0, 6), slice(6, None))
    ]
    for field in ("total", "ce", "div"):
        torch.testing.assert_close(sum(getattr(p, field) for p in parts), getattr(whole, field))
    assert sum(p.tokens for p in parts) == whole.tokens
    g_parts = torch.autograd.grad(sum(p.total for p in parts), b.leaves())
    for gp, gw in zip(g_parts, g_whole, strict=True):
        torch.testing.assert_close(gp, gw)


@pytest.mark.parametrize("divergence", ["forward_kl", "js"])
def test_bf16_inputs(divergence):
    b32 = make_batch(n=10, dtype=torch.float32, seed=2)
    b16 = make_batch(n=10, dtype=torch.bfloat16, seed=2)
    out, grads = run(fused_distill_loss, b16, divergence, chunk_tokens=4)
    assert out.total.dtype == torch.float32
    for g, leaf in zip(grads, b16.leaves(), strict=True):
        assert g.dtype == torch.bfloat16 and g.shape == leaf.shape and torch.isfinite(g).all()
    # Same math as the reference on the same bf16 inputs ...
    assert_same((out, grads), run(naive_distill_loss, b16, divergence), rtol=2e-2, atol=2e-2)
    # ... and close to the float32 result.
    ref, ref_grads = run(fused_distill_loss, b32, divergence, chunk_tokens=4)
    torch.testing.assert_close(out.total, ref.total, rtol=2e-2, atol=0.0)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.float(), r, rtol=0.1, atol=0.05)


def test_no_grad_mode_gives_same_values():
    b = make_batch()
    kw = dict(vocab_size=b.vocab, gamma=0.5, tau=1.0, divergence="js", chunk_tokens=4)
    with_grad = fused_distill_loss(b.hidden, b.weight, b.labels, b.teacher, **kw)
    with torch.no_grad():
        no_grad = fused_distill_loss(b.hidden, b.weight, b.labels, b.teacher, **kw)
    assert not no_grad.total.requires_grad
    torch.testing.assert_close(no_grad.total, with_grad.total.detach())


def test_chunked_ce_sum():
    b = make_batch(n=15, seed=4)
    ce, tokens = chunked_ce_sum(
        b.hidden, b.weight, b.labels, vocab_size=b.vocab, chunk_tokens=4, head_bias=b.bias
    )
    logits = (b.hidden @ b.weight.T + b.bias)[:, : b.vocab]
    torch.testing.assert_close(ce, F.cross_entropy(logits, b.labels, reduction="sum"))
    assert tokens == int((b.labels != IGNORE_INDEX).sum()) and not ce.requires_grad
    assert math.isfinite(math.exp(ce.item() / tokens))
    empty, zero = chunked_ce_sum(
        b.hidden, b.weight, torch.full_like(b.labels, IGNORE_INDEX), vocab_size=b.vocab
    )
    assert empty.item() == 0.0 and zero == 0


def test_module_from_config():
    b = make_batch()
    cfg = DistillSection(gamma=0.25, tau=1.5, divergence="reverse_kl", loss_chunk_tokens=3)
    loss = loss_from_config(cfg, vocab_size=b.vocab)
    assert "reverse_kl" in repr(loss)
    out = loss(b.hidden, b.weight, b.labels, b.teacher, b.bias)
    ref = naive_distill_loss(
        b.hidden, b.weight, b.labels, b.teacher,
        vocab_size=b.vocab, gamma=0.25, tau=1.5, divergence="reverse_kl",
        student_head_bias=b.bias,
    )  # fmt: skip
    torch.testing.assert_close(out.total, ref.total)


def test_invalid_arguments():
    b = make_batch()
    kw = dict(gamma=0.5, tau=1.0, divergence="forward_kl")
    args = (b.hidden, b.weight, b.labels, b.teacher)
    with pytest.raises(ValueError, match="unknown divergence"):
        fused_distill_loss(*args, vocab_size=b.vocab, **{**kw, "divergence": "kl"})
    with pytest.raises(ValueError, match="vocab_size"):
        fused_distill_loss(*args, vocab_size=b.weight.shape[0] + 1, **kw)
    with pytest.raises(ValueError, match="teacher head"):
        fused_distill_loss(*args, vocab_size=b.t_weight.shape[0] + 1, **kw)
    with pytest.raises(ValueError, match="tau"):
        fused_distill_loss(*args, vocab_size=b.vocab, **{**kw, "tau": 0.0})
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_distill_loss(*args, vocab_size=b.vocab, chunk_tokens=0, **kw)
    with pytest.raises(ValueError, match="no head_weight"):
        fused_distill_loss(
            b.hidden, b.weight, b.labels, DenseSignal(b.t_hidden, None), vocab_size=b.vocab, **kw
        )
    with pytest.raises(ValueError, match="DenseSignal"):
        fused_distill_loss(b.hidden, b.weight, b.labels, b.t_hidden, vocab_size=b.vocab, **kw)
    with pytest.raises(ValueError, match="unknown divergence"):
        FusedDistillLoss(b.vocab, divergence="kl")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("divergence", ["forward_kl", "js"])
def test_cuda_bf16_matches_naive(divergence):
    b = make_batch(
        n=300, h=64, ht=96, vocab=500, v_student=512, v_teacher=512, dtype=torch.bfloat16
    )
    for name in ("hidden", "weight", "bias", "labels", "t_hidden", "t_weight", "t_bias"):
        x = getattr(b, name)
        setattr(b, name, x.detach().cuda().requires_grad_(x.requires_grad))
    fused = run(fused_distill_loss, b, divergence, chunk_tokens=64)
    assert all(g.is_cuda and g.dtype == torch.bfloat16 for g in fused[1])
    assert_same(fused, run(naive_distill_loss, b, divergence), rtol=2e-2, atol=2e-2)
