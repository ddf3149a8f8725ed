"""Per-token divergences against hand-written float64 formulas."""

from __future__ import annotations

import typing

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from ddk.config import Divergence
from ddk.losses.divergences import (
    DIVERGENCE_TERMS,
    DIVERGENCES,
    NO_DIVERGENCE,
    forward_kl,
    get_divergence,
    js,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
)

NAMES = sorted(DIVERGENCES)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    student = 2.0 * torch.randn(6, 17, generator=g, dtype=torch.float64)
    teacher = 2.0 * torch.randn(6, 17, generator=g, dtype=torch.float64)
    return student, teacher


def _probs(z: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.softmax(z / tau, dim=-1)


def _kl_sum(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p / q).log()).sum(-1)


def reference(name: str, s: torch.Tensor, t: torch.Tensor, tau: float, lam: float) -> torch.Tensor:
    """Explicit-sum formulas in float64, written independently of the module."""
    ps, pt = _probs(s, tau), _probs(t, tau)
    if name == "forward_kl":
        return kl_divergence(Categorical(probs=pt), Categorical(probs=ps))
    if name == "reverse_kl":
        return kl_divergence(Categorical(probs=ps), Categorical(probs=pt))
    if name == "js":
        m = 0.5 * (ps + pt)
        return 0.5 * _kl_sum(pt, m) + 0.5 * _kl_sum(ps, m)
    if name == "skew_kl":
        return _kl_sum(pt, lam * pt + (1 - lam) * ps)
    if name == "skew_reverse_kl":
        return _kl_sum(ps, lam * ps + (1 - lam) * pt)
    raise AssertionError(name)


def test_registry_matches_config_literal():
    assert set(DIVERGENCES) | {NO_DIVERGENCE} == set(typing.get_args(Divergence))
    assert NO_DIVERGENCE not in DIVERGENCES
    assert len(typing.get_args(Divergence)) == len(DIVERGENCES) + 1


def test_registry_functions():
    expected = {
        "forward_kl": forward_kl,
        "reverse_kl": reverse_kl,
        "js": js,
        "skew_kl": skew_kl,
        "skew_reverse_kl": skew_reverse_kl,
    }
    assert DIVERGENCES == expected
    assert get_divergence("none") is None
    assert get_divergence("js") is js
    with pytest.raises(ValueError, match="unknown divergence 'kl'.*forward_kl"):
        get_divergence("kl")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tau", [1.0, 0.5, 2.5])
def test_matches_reference(name, tau, logits):
    s, t = logits
    out = DIVERGENCES[name](s, t, tau, 0.3)
    assert out.shape == (6,) and out.dtype == torch.float64
    torch.testing.assert_close(out, reference(name, s, t, tau, 0.3), rtol=1e-10, atol=1e-12)
    assert (out > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_half_inputs_use_float32(name, logits):
    s, t = logits
    out = DIVERGENCES[name](s.bfloat16(), t.bfloat16(), 1.0, 0.3)
    assert out.dtype == torch.float32
    ref = reference(name, s.bfloat16().double(), t.bfloat16().double(), 1.0, 0.3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
def test_identical_distributions_give_zero(name, lam, logits):
    s, _ = logits
    out = DIVERGENCES[name](s, s.clone(), 1.3, lam)
    torch.testing.assert_close(out, torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_directions_differ(logits):
    s, t = logits
    fwd, rev = forward_kl(s, t, 1.0, 0.1), reverse_kl(s, t, 1.0, 0.1)
    assert not torch.allclose(fwd, rev)
    # Swapping the arguments swaps the direction.
    torch.testing.assert_close(forward_kl(t, s, 1.0, 0.1), rev)
    torch.testing.assert_close(skew_kl(t, s, 1.0, 0.2), skew_reverse_kl(s, t, 1.0, 0.2))
    # JS is symmetric.
    torch.testing.assert_close(js(s, t, 1.0, 0.0), js(t, s, 1.0, 0.0))


def test_skew_limits(logits):
    s, t = logits
    # λ = 0 is the plain KL; λ = 1 compares a distribution with itself.
    torch.testing.assert_close(skew_kl(s, t, 1.0, 0.0), forward_kl(s, t, 1.0, 0.0))
    torch.testing.assert_close(skew_reverse_kl(s, t, 1.0, 0.0), reverse_kl(s, t, 1.0, 0.0))
    torch.testing.assert_close(skew_kl(s, t, 1.0, 1.0), torch.zeros(6, dtype=torch.float64))
    # Skewing towards the target shrinks the divergence.
    assert (skew_kl(s, t, 1.0, 0.5) < forward_kl(s, t, 1.0, 0.0)).all()


@pytest.mark.parametrize("name", NAMES)
def test_temperature_applied_to_both_sides(name, logits):
    s, t = logits
    tau = 2.0
    out = DIVERGENCES[name](s, t, tau, 0.3)
    assert not torch.allclose(out, DIVERGENCES[name](s, t, 1.0, 0.3))
    torch.testing.assert_close(out, DIVERGENCES[name](s / tau, t / tau, 1.0, 0.3))
    # Scaling only one side would give a different value.
    only_student = reference(name, s / tau, t, 1.0, 0.3)
    only_teacher = reference(name, s, t / tau, 1.0, 0.3)
    assert not torch.allclose(out, only_student)
    assert not torch.allclose(out, only_teacher)


@pytest.mark.parametrize("name", NAMES)
def test_zero_probabilities_are_finite(name, logits):
    """-inf logits (probability exactly 0) give no NaN in value or gradient."""
    s, t = (x.clone() for x in logits)
    s[:, :3] = float("-inf")
    t[:, :3] = float("-inf")  # both sides zero on the same tokens
    s.requires_grad_(True)
    out = DIVERGENCES[name](s, t, 1.0, 0.3)
    assert torch.isfinite(out).all()
    # The zero-probability tokens simply drop out of the sums.
    ref = reference(name, s.detach()[:, 3:], t[:, 3:], 1.0, 0.3)
    torch.testing.assert_close(out.detach(), ref)
    out.sum().backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize(
    "name,side",
    [
        ("forward_kl", "teacher"),
        ("reverse_kl", "student"),
        ("js", "teacher"),
        ("js", "student"),
        ("skew_kl", "teacher"),
        ("skew_kl", "student"),
        ("skew_reverse_kl", "teacher"),
        ("skew_reverse_kl", "student"),
    ],
)
def test_zero_probability_on_one_side(name, side, logits):
    """Cases with a finite true value stay finite when only one side has a zero."""
    s, t = (x.clone() for x in logits)
    (t if side == "teacher" else s)[:, :2] = float("-inf")
    s.requires_grad_(True)
    out = DIVERGENCES[name](s, t, 1.0, 0.3)
    assert torch.isfinite(out).all()
    ps, pt = _probs(s.detach(), 1.0), _probs(t, 1.0)
    if name == "js":
        m = 0.5 * (ps + pt)
        ref = 0.5 * torch.xlogy(pt, pt / m).sum(-1) + 0.5 * torch.xlogy(ps, ps / m).sum(-1)
    else:
        p, q = (pt, ps) if name in ("forward_kl", "skew_kl") else (ps, pt)
        lam = 0.0 if name in ("forward_kl", "reverse_kl") else 0.3
        ref = torch.xlogy(p, p / (lam * p + (1 - lam) * q)).sum(-1)
    torch.testing.assert_close(out.detach(), ref)
    out.sum().backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_reference(name, logits):
    s, t = logits
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    DIVERGENCES[name](s1, t, 1.5, 0.3).sum().backward()
    reference(name, s2, t, 1.5, 0.3).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-12)


def test_log_mix_gradient():
    """The fused log-mixture primitive: value, gradcheck, and no NaN where both sides are 0."""
    from ddk.losses.divergences import _log_mix

    g = torch.Generator().manual_seed(1)
    a = torch.log_softmax(torch.randn(3, 7, generator=g, dtype=torch.float64), -1)
    b = torch.log_softmax(torch.randn(3, 7, generator=g, dtype=torch.float64), -1)
    a.requires_grad_(True)
    b.requires_grad_(True)
    expected = (0.3 * a.exp() + 0.7 * b.exp()).log()
    torch.testing.assert_close(_log_mix(a, b, 0.3), expected)
    assert torch.autograd.gradcheck(lambda x, y: _log_mix(x, y, 0.3), (a, b))
    a2, b2 = a.detach().clone(), b.detach().clone()
    a2[0, :2] = b2[0, :2] = float("-inf")  # both zero
    a2[1, 2] = float("-inf")  # one zero
    a2.requires_grad_(True)
    b2.requires_grad_(True)
    out = _log_mix(a2, b2, 0.3)
    assert torch.isneginf(out[0, :2]).all() and torch.isfinite(out[1]).all()
    out.masked_fill(torch.isneginf(out), 0.0).sum().backward()
    assert torch.isfinite(a2.grad).all() and torch.isfinite(b2.grad).all()
    assert (a2.grad[0, :2] == 0).all() and (b2.grad[0, :2] == 0).all()
    assert a2.grad[1, 2] == 0 and b2.grad[1, 2] == 1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_terms_sum_to_the_divergence(name, tau, logits):
    """The per-entry terms (the sampled estimator's building block): value and gradient."""
    s, t = logits
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    log_p, log_q = torch.log_softmax(t / tau, -1), torch.log_softmax(s2 / tau, -1)
    terms = DIVERGENCE_TERMS[name](log_p, log_q, 0.3)
    assert terms.shape == s.shape
    dense = DIVERGENCES[name](s1, t, tau, 0.3)
    torch.testing.assert_close(terms.sum(-1), dense, rtol=1e-12, atol=1e-12)
    dense.sum().backward()
    terms.sum().backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-10, atol=1e-12)
