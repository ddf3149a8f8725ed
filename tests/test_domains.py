"""DDK domain weights: Eq. 1, Eq. 2, fixed mixtures and the per-method dispatch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddk.domains import (
    METHODS,
    PAPER,
    Steering,
    apply_min_share,
    bounded_rescale,
    domain_gap,
    fixed_mixture,
    floored_initial_weights,
    initial_weights,
    limit_change,
    next_weights,
    perplexity_ratio,
    prior_tilt,
    smooth_update,
    steering_exponent,
    uniform_weights,
    worst_focus_weights,
)

E = math.e


# ----------------------------------------------------------------------------- ratio
def test_perplexity_ratio_is_student_over_teacher_float64():
    r = perplexity_ratio([4.0, 3.0, 10.0], [2.0, 3.0, 4.0])
    assert r.dtype == np.float64
    np.testing.assert_array_equal(r, [2.0, 1.0, 2.5])


def test_perplexity_ratio_length_mismatch():
    with pytest.raises(ValueError, match="2 student perplexities but 3 teacher"):
        perplexity_ratio([1.0, 2.0], [1.0, 2.0, 3.0])


# ----------------------------------------------------------------------------- Eq. 1
def test_eq1_two_domains_by_hand():
    # ratios [1, 2] -> r0 = [1/(1+e), e/(1+e)] = [0.26894142..., 0.73105857...]
    r0 = initial_weights([2.0, 4.0], [2.0, 2.0])
    np.testing.assert_allclose(r0, [1 / (1 + E), E / (1 + E)], rtol=1e-15, atol=0)
    np.testing.assert_allclose(r0, [0.2689414213699951, 0.7310585786300049], rtol=1e-15)
    assert r0.dtype == np.float64


def test_eq1_three_domains_by_hand():
    # ratios [1, 2, 3] -> [1, e, e^2] / (1 + e + e^2) = [0.09003057, 0.24472847, 0.66524096]
    r0 = initial_weights([1.0, 4.0, 6.0], [1.0, 2.0, 2.0])
    z = 1 + E + E**2
    np.testing.assert_allclose(r0, [1 / z, E / z, E**2 / z], rtol=1e-14)
    np.testing.assert_allclose(r0, [0.09003057317038046, 0.24472847105479767, 0.6652409557748219])


def test_eq1_equal_ratios_give_uniform():
    np.testing.assert_allclose(initial_weights([3.0, 6.0, 9.0], [1.0, 2.0, 3.0]), [1 / 3] * 3)


@pytest.mark.parametrize("big", [100.0, 1000.0, 1e5])
def test_eq1_huge_ratios_do_not_overflow(big):
    # exp(100) overflows float32, exp(1000) and exp(1e5) overflow float64.
    # Softmax is shift-invariant, so ratios [big, big + 1] must give [1/(1+e), e/(1+e)].
    r0 = initial_weights([big, big + 1.0], [1.0, 1.0])
    assert np.all(np.isfinite(r0))
    np.testing.assert_allclose(r0, [1 / (1 + E), E / (1 + E)], rtol=1e-9)


def test_eq1_ratio_of_a_million():
    r0 = initial_weights([1e6, 1.0, 2.0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(r0, [1.0, 0.0, 0.0], atol=1e-300)
    assert r0.sum() == pytest.approx(1.0)


def test_eq1_matches_naive_float64_where_it_does_not_overflow():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 12))
        teacher = rng.uniform(1.0, 50.0, n)
        student = teacher * rng.uniform(0.5, 60.0, n)  # ratios up to 60: exp fits float64
        x = student / teacher
        naive = np.exp(x) / np.exp(x).sum()
        np.testing.assert_allclose(initial_weights(student, teacher), naive, rtol=1e-12)


# ----------------------------------------------------------------------------- Eq. 2
def test_eq2_by_hand_uniform_prior():
    # r = [.5, .5], ratios [1, 2]: psi ∝ [e, e^2] -> [1/(1+e), e/(1+e)];
    # r' = .5 * that + .25 = [0.38447071068, 0.61552928932]
    r = smooth_update([0.5, 0.5], [1.0, 2.0], [1.0, 1.0], alpha=0.5)
    np.testing.assert_allclose(r, [0.5 / (1 + E) + 0.25, 0.5 * E / (1 + E) + 0.25], rtol=1e-15)
    np.testing.assert_allclose(r, [0.38447071068499755, 0.6155292893150024], rtol=1e-15)


def test_eq2_by_hand_skewed_prior():
    # r = [.2, .8], ratios [2, 1]: psi = [.2 e^2, .8 e] ∝ [e, 4] -> [e/(e+4), 4/(e+4)];
    # alpha = .5: r' = [.5 e/(e+4) + .25, .5 * 4/(e+4) + .25] = [0.45230484, 0.54769516]
    r = smooth_update([0.2, 0.8], [4.0, 3.0], [2.0, 3.0], alpha=0.5)
    np.testing.assert_allclose(r, [0.5 * E / (E + 4) + 0.25, 2 / (E + 4) + 0.25], rtol=1e-14)
    np.testing.assert_allclose(r, [0.45230483759, 0.54769516241], rtol=1e-10)


def test_eq2_by_hand_three_domains_alpha_03():
    # r = [.5, .25, .25], ratios [1, 1, 2]: psi ∝ [2, 1, e] -> / (3 + e);
    # r' = .3 * psi_norm + .7/3
    r = smooth_update([0.5, 0.25, 0.25], [1.0, 1.0, 2.0], [1.0, 1.0, 1.0], alpha=0.3)
    z = 3 + E
    np.testing.assert_allclose(r, [0.3 * 2 / z + 0.7 / 3, 0.3 / z + 0.7 / 3, 0.3 * E / z + 0.7 / 3])


def test_eq2_zero_weight_gets_floor_not_nan():
    r = smooth_update([0.0, 1.0], [5.0, 1.0], [1.0, 1.0], alpha=0.5)
    np.testing.assert_array_equal(r, [0.25, 0.75])
    # With a huge ratio on the zero-weight domain as well (-inf + 1e6 stays -inf).
    r = smooth_update([0.0, 1.0], [1e6, 1.0], [1.0, 1.0], alpha=0.5)
    np.testing.assert_array_equal(r, [0.25, 0.75])


def test_eq2_alpha_extremes():
    ratios_s, ratios_t = [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]
    np.testing.assert_allclose(smooth_update([0.2, 0.3, 0.5], ratios_s, ratios_t, 0.0), [1 / 3] * 3)
    psi = np.array([0.2, 0.3, 0.5]) * np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(
        smooth_update([0.2, 0.3, 0.5], ratios_s, ratios_t, 1.0), psi / psi.sum(), rtol=1e-14
    )


def test_eq2_scale_of_prior_does_not_matter():
    a = smooth_update([1.0, 3.0], [2.0, 3.0], [1.0, 1.0], 0.5)
    b = smooth_update([0.25, 0.75], [2.0, 3.0], [1.0, 1.0], 0.5)
    np.testing.assert_allclose(a, b, rtol=1e-15)


@pytest.mark.parametrize("big", [100.0, 1000.0, 1e5, 1e6])
def test_eq2_huge_ratios_do_not_overflow(big):
    r = smooth_update([0.5, 0.5], [big, big + 1.0], [1.0, 1.0], alpha=0.5)
    assert np.all(np.isfinite(r))
    np.testing.assert_allclose(r, [0.5 / (1 + E) + 0.25, 0.5 * E / (1 + E) + 0.25], rtol=1e-9)


def test_eq2_matches_naive_float64_where_it_does_not_overflow():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(1, 12))
        teacher = rng.uniform(1.0, 50.0, n)
        student = teacher * rng.uniform(0.5, 60.0, n)
        r = rng.dirichlet(np.ones(n))
        alpha = float(rng.uniform())
        psi = r * np.exp(student / teacher)
        naive = alpha * psi / psi.sum() + (1 - alpha) / n
        np.testing.assert_allclose(smooth_update(r, student, teacher, alpha), naive, rtol=1e-12)


def test_eq1_eq2_properties_over_random_inputs():
    """Property test (seeded): weights are finite, sum to 1 and Eq. 2 keeps the floor."""
    rng = np.random.default_rng(2)
    for _ in range(300):
        n = int(rng.integers(1, 16))
        teacher = np.exp(rng.uniform(0.0, 12.0, n))  # perplexities 1 .. 1.6e5
        student = np.exp(rng.uniform(0.0, 14.0, n))  # ratios up to ~1e6
        alpha = float(rng.choice([0.0, 1.0, rng.uniform()]))
        r = rng.dirichlet(np.ones(n)) * (rng.uniform(size=n) > 0.3)
        if not r.any():
            r[int(rng.integers(n))] = 1.0

        r0 = initial_weights(student, teacher)
        assert np.all(np.isfinite(r0)) and np.all(r0 >= 0)
        assert r0.sum() == pytest.approx(1.0, abs=1e-12)

        r1 = smooth_update(r, student, teacher, alpha)
        assert np.all(np.isfinite(r1))
        assert r1.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(r1 >= (1 - alpha) / n)

        # Iterating Eq. 2 keeps all of the above.
        r2 = smooth_update(r1, student, teacher, alpha)
        assert r2.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(r2 >= (1 - alpha) / n)


# ------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "student, teacher, who",
    [
        ([1.0, float("nan"), 2.0], [1.0, 1.0, 1.0], "student"),
        ([1.0, float("inf"), 2.0], [1.0, 1.0, 1.0], "student"),
        ([1.0, 0.0, 2.0], [1.0, 1.0, 1.0], "student"),
        ([1.0, 2.0, 2.0], [1.0, float("nan"), 1.0], "teacher"),
        ([1.0, 2.0, 2.0], [1.0, float("inf"), 1.0], "teacher"),
        ([1.0, 2.0, 2.0], [1.0, 0.0, 1.0], "teacher"),
        ([1.0, 2.0, 2.0], [1.0, -3.0, 1.0], "teacher"),
    ],
)
def test_non_finite_perplexity_raises_naming_the_domain(student, teacher, who):
    domains = ["web", "code", "math"]
    for fn in (
        lambda: initial_weights(student, teacher, domains),
        lambda: smooth_update([1 / 3] * 3, student, teacher, 0.5, domains),
        lambda: next_weights("ddk", 0, None, student, teacher, 0.5, None, domains),
        lambda: next_weights("ddk", 3, [1 / 3] * 3, student, teacher, 0.5, None, domains),
        lambda: next_weights("ddk_no_smoothing", 3, None, student, teacher, 0.5, None, domains),
    ):
        with pytest.raises(ValueError, match=rf"{who} perplexity.*domain 1 \('code'\)") as err:
            fn()
        assert "\n" not in str(err.value)
    # Without names the index is still given.
    with pytest.raises(ValueError, match=r"domain 1 = "):
        initial_weights(student, teacher)


def test_ratio_overflow_raises():
    with pytest.raises(ValueError, match=r"overflows.*domain 0 \('web'\)"):
        initial_weights([1e300, 1.0], [1e-300, 1.0], ["web", "code"])


def test_eq2_bad_weights_and_alpha():
    with pytest.raises(ValueError, match="all zero"):
        smooth_update([0.0, 0.0], [1.0, 2.0], [1.0, 1.0], 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        smooth_update([-0.1, 1.1], [1.0, 2.0], [1.0, 1.0], 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        smooth_update([float("nan"), 1.0], [1.0, 2.0], [1.0, 1.0], 0.5)
    with pytest.raises(ValueError, match="3 entries for 2 domains"):
        smooth_update([0.2, 0.3, 0.5], [1.0, 2.0], [1.0, 1.0], 0.5)
    with pytest.raises(ValueError, match="alpha"):
        smooth_update([0.5, 0.5], [1.0, 2.0], [1.0, 1.0], 1.5)


# ------------------------------------------------------------------- fixed mixtures
DOMAINS = ["web", "code", "math"]


def test_fixed_mixture_natural():
    w = fixed_mixture(DOMAINS, "natural", {"web": 600, "code": 300, "math": 100, "other": 5})
    np.testing.assert_allclose(w, [0.6, 0.3, 0.1])
    assert w.dtype == np.float64


def test_fixed_mixture_uniform():
    np.testing.assert_allclose(fixed_mixture(DOMAINS, "uniform"), [1 / 3] * 3)
    np.testing.assert_allclose(uniform_weights(4), [0.25] * 4)


def test_fixed_mixture_dict_normalises_and_fills_missing_with_zero():
    np.testing.assert_allclose(fixed_mixture(DOMAINS, {"web": 3, "math": 1}), [0.75, 0.0, 0.25])
    np.testing.assert_allclose(fixed_mixture(DOMAINS, {"code": 0.2}), [0.0, 1.0, 0.0])


@pytest.mark.parametrize(
    "spec, tokens, match",
    [
        ({"web": 1, "chinese": 1}, None, "unknown domain 'chinese'"),
        ({"web": -1, "code": 2}, None, "domain 'web' must be finite and >= 0"),
        ({"web": float("nan")}, None, "domain 'web' must be finite"),
        ({"web": "lots"}, None, "domain 'web' must be a number"),
        ({"web": 0, "code": 0}, None, "all zero"),
        ({}, None, "all zero"),
        ("natural", None, "token count"),
        ("natural", {"web": 1, "code": 2}, "no token count for domain 'math'"),
        ("natural", {"web": 0, "code": 0, "math": 0}, "0 tokens"),
        ("natural", {"web": -5, "code": 0, "math": 1}, "domain 'web' must be >= 0"),
        ("zipf", None, "'natural', 'uniform' or"),
        (0.5, None, "'natural', 'uniform' or"),
    ],
)
def test_fixed_mixture_errors(spec, tokens, match):
    with pytest.raises(ValueError, match=match) as err:
        fixed_mixture(DOMAINS, spec, tokens)
    assert "\n" not in str(err.value)


def test_fixed_mixture_rejects_no_or_duplicate_domains():
    with pytest.raises(ValueError, match="at least one domain"):
        fixed_mixture([], "uniform")
    with pytest.raises(ValueError, match="duplicate"):
        fixed_mixture(["web", "web"], "uniform")


# ---------------------------------------------------------------------- next_weights
STUDENT = [4.0, 3.0, 12.0]
TEACHER = [2.0, 3.0, 4.0]  # ratios [2, 1, 3]
FIXED = np.array([0.5, 0.3, 0.2])


def test_next_weights_ddk_eq1_then_eq2():
    r0 = next_weights("ddk", 0, None, STUDENT, TEACHER, 0.5, FIXED, DOMAINS)
    np.testing.assert_allclose(r0, initial_weights(STUDENT, TEACHER))
    r1 = next_weights("ddk", 1, r0, STUDENT, TEACHER, 0.5, FIXED, DOMAINS)
    np.testing.assert_allclose(r1, smooth_update(r0, STUDENT, TEACHER, 0.5))
    assert not np.allclose(r1, r0)
    with pytest.raises(ValueError, match="previous interval's weights"):
        next_weights("ddk", 1, None, STUDENT, TEACHER, 0.5, FIXED)


def test_next_weights_ddk_no_smoothing_is_eq1_every_time():
    expected = initial_weights(STUDENT, TEACHER)
    for t in (0, 1, 7):
        w = next_weights("ddk_no_smoothing", t, [0.9, 0.05, 0.05], STUDENT, TEACHER, 0.5, FIXED)
        np.testing.assert_allclose(w, expected)


@pytest.mark.parametrize("method", ["kd", "cpt"])
def test_next_weights_fixed_methods(method):
    for t in (0, 5):
        # Perplexities are not needed (and bad ones are not looked at).
        w = next_weights(method, t, None, None, None, 0.5, FIXED, DOMAINS)
        np.testing.assert_array_equal(w, FIXED)
        assert w is not FIXED
        w = next_weights(method, t, None, [float("nan")] * 3, TEACHER, 0.5, FIXED)
        np.testing.assert_array_equal(w, FIXED)
    with pytest.raises(ValueError, match="needs a fixed mixture"):
        next_weights(method, 0, None, STUDENT, TEACHER, 0.5, None)
    with pytest.raises(ValueError, match="sum to 1"):
        next_weights(method, 0, None, STUDENT, TEACHER, 0.5, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="2 entries for 3 domains"):
        next_weights(method, 0, None, STUDENT, TEACHER, 0.5, [0.5, 0.5])


def test_next_weights_equal_is_uniform():
    for t in (0, 3):
        w = next_weights("equal", t, None, STUDENT, TEACHER, 0.5, FIXED)
        np.testing.assert_allclose(w, [1 / 3] * 3)
    np.testing.assert_allclose(
        next_weights("equal", 0, None, None, None, 0.5, None, DOMAINS), [1 / 3] * 3
    )


def test_next_weights_every_method_sums_to_one():
    for method in METHODS:
        w = next_weights(method, 2, FIXED, STUDENT, TEACHER, 0.5, FIXED, DOMAINS)
        assert w.sum() == pytest.approx(1.0)


def test_next_weights_errors():
    with pytest.raises(ValueError, match="unknown method 'doremi'"):
        next_weights("doremi", 0, None, STUDENT, TEACHER, 0.5, FIXED)
    with pytest.raises(ValueError, match="interval must be >= 0"):
        next_weights("ddk", -1, None, STUDENT, TEACHER, 0.5, FIXED)
    with pytest.raises(ValueError, match="number of domains"):
        next_weights("equal", 0, None, None, None, 0.5, None)


# ------------------------------------------------------------ steering beyond the paper
def _naive_gap(student, teacher, gap, clip):
    if gap == "ratio":
        g = [s / t for s, t in zip(student, teacher)]
        return [max(v, 1.0) for v in g] if clip else g
    g = [math.log(s) - math.log(t) for s, t in zip(student, teacher)]
    return [max(v, 0.0) for v in g] if clip else g


def _random_case(rng, n=None, spread=4.0):
    n = n or int(rng.integers(1, 10))
    teacher = rng.uniform(1.0, 50.0, n)
    student = teacher * np.exp(rng.uniform(-1.0, spread, n))  # some ratios below 1
    return student, teacher


@pytest.mark.parametrize("gap", ["ratio", "log_ratio"])
@pytest.mark.parametrize("clip", [False, True])
def test_domain_gap_matches_naive(gap, clip):
    rng = np.random.default_rng(3)
    for _ in range(30):
        s, t = _random_case(rng)
        np.testing.assert_allclose(domain_gap(s, t, gap, clip), _naive_gap(s, t, gap, clip),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip


def test_domain_gap_by_hand_and_errors():
    # student 2x the teacher on 'a', half of it on 'b'
    np.testing.assert_allclose(domain_gap([4.0, 1.0], [2.0, 2.0], "log_ratio"),
                               [math.log(2), -math.log(2)])  # fmt: skip
    np.testing.assert_allclose(domain_gap([4.0, 1.0], [2.0, 2.0], "log_ratio", clip=True),
                               [math.log(2), 0.0])  # fmt: skip
    np.testing.assert_allclose(domain_gap([4.0, 1.0], [2.0, 2.0], "ratio", clip=True), [2.0, 1.0])
    # a log-ratio stays exact where the ratio itself would be huge
    assert domain_gap([1e300], [1e-5], "log_ratio")[0] == pytest.approx(
        300 * math.log(10) + 5 * math.log(10)
    )
    with pytest.raises(ValueError, match="gap must be"):
        domain_gap([1.0], [1.0], "difference")
    with pytest.raises(ValueError, match=r"student perplexity.*domain 0 \('web'\)"):
        domain_gap([float("nan")], [1.0], "log_ratio", domains=["web"])


@pytest.mark.parametrize("gap", ["ratio", "log_ratio"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_eq1_eq2_with_gap_and_temperature_match_naive(gap, temperature):
    rng = np.random.default_rng(4)
    steering = Steering(gap=gap, temperature=temperature, clip_gap=True)
    for _ in range(30):
        s, t = _random_case(rng, spread=3.0)
        x = np.array(_naive_gap(s, t, gap, True)) / temperature
        naive0 = np.exp(x) / np.exp(x).sum()
        np.testing.assert_allclose(initial_weights(s, t, steering=steering), naive0, rtol=1e-12)
        r, alpha = rng.dirichlet(np.ones(len(s))), float(rng.uniform())
        psi = r * np.exp(x)
        naive = alpha * psi / psi.sum() + (1 - alpha) / len(s)
        np.testing.assert_allclose(smooth_update(r, s, t, alpha, steering=steering), naive,
                                   rtol=1e-12)  # fmt: skip
        floored = floored_initial_weights(s, t, alpha, steering=steering)
        np.testing.assert_allclose(floored, alpha * naive0 + (1 - alpha) / len(s), rtol=1e-12)


def test_log_ratio_is_not_one_hot_where_the_ratio_is():
    s, t = [60.0, 5.0, 2.0, 13.0], [1.0, 1.0, 1.0, 1.0]  # the demo's starting gaps, roughly
    assert initial_weights(s, t).min() < 1e-15
    w = initial_weights(s, t, steering=Steering(gap="log_ratio"))
    np.testing.assert_allclose(w, np.array(s) / sum(s))  # softmax(log x) = x / sum(x)
    flat = initial_weights(s, t, steering=Steering(gap="log_ratio", temperature=2.0))
    np.testing.assert_allclose(flat, np.sqrt(s) / np.sqrt(s).sum())


def _naive_rescale(p, lo, hi):
    """Bisection on log s; no clever breakpoints."""
    p = np.maximum(np.asarray(p, float) / np.sum(p), np.finfo(float).tiny)
    a, b = -800.0, 800.0
    for _ in range(300):
        m = 0.5 * (a + b)
        with np.errstate(over="ignore"):
            below = np.clip(np.exp(m) * p, lo, hi).sum() < 1.0
        if below:
            a = m
        else:
            b = m
    return np.clip(np.exp(b) * p, lo, hi)


def test_bounded_rescale_matches_bisection():
    rng = np.random.default_rng(5)
    for _ in range(300):
        n = int(rng.integers(1, 9))
        p = rng.dirichlet(np.ones(n) * 0.3) * (rng.uniform(size=n) > 0.2)
        if not p.any():
            p[0] = 1.0
        q = rng.dirichlet(np.ones(n))
        c = float(rng.uniform(1.0, 4.0))
        lo, hi = q / c, np.minimum(q * c, 1.0)
        if rng.uniform() < 0.3:  # a lower bound only, as min_share uses it
            lo, hi = np.full(n, float(rng.uniform(0, 1)) / n), np.ones(n)
        got = bounded_rescale(p, lo, hi)
        assert got.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(got >= lo - 1e-12) and np.all(got <= hi + 1e-12)
        np.testing.assert_allclose(got, _naive_rescale(p, lo, hi), rtol=1e-7, atol=1e-12)
        free = (got > lo + 1e-9) & (got < hi - 1e-9) & (p > 0)
        if free.sum() >= 2:  # the unclipped keep their proportions
            ratio = got[free] / p[free]
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)


def test_bounded_rescale_by_hand_and_errors():
    np.testing.assert_allclose(bounded_rescale([0.7, 0.2, 0.1], 0.2, 1.0), [0.6, 0.2, 0.2])
    np.testing.assert_allclose(bounded_rescale([1.0, 1.0], [0.5, 0.5], [0.5, 0.5]), [0.5, 0.5])
    # the zero-weight domain takes what the capped one cannot
    np.testing.assert_allclose(bounded_rescale([0.0, 1.0], [0.0, 0.0], [1.0, 0.3]), [0.7, 0.3])
    with pytest.raises(ValueError, match="sum to 1"):
        bounded_rescale([0.5, 0.5], 0.6, 1.0)
    with pytest.raises(ValueError, match="sum to 1"):
        bounded_rescale([0.5, 0.5], 0.0, 0.4)
    with pytest.raises(ValueError, match="lower <= upper"):
        bounded_rescale([0.5, 0.5], [0.5, 0.5], [0.4, 0.6])


def test_min_share_by_hand():
    # N = 3, min_share 0.5: every weight >= 1/6; the rest keeps its proportions
    np.testing.assert_allclose(apply_min_share([1.0, 0.0, 0.0], 0.5), [2 / 3, 1 / 6, 1 / 6])
    np.testing.assert_allclose(apply_min_share([0.6, 0.3, 0.1], 0.6), [0.6 * 0.8 / 0.9,
                               0.3 * 0.8 / 0.9, 0.2])  # fmt: skip
    np.testing.assert_allclose(apply_min_share([0.9, 0.1], 1.0), [0.5, 0.5])  # = uniform
    np.testing.assert_allclose(apply_min_share([0.9, 0.1], 0.0), [0.9, 0.1])


def test_limit_change_by_hand():
    # uniform before, one-hot proposal, factor 2: the winner may only double
    np.testing.assert_allclose(limit_change([0.25] * 4, [0.97, 0.01, 0.01, 0.01], 2.0),
                               [0.5, 1 / 6, 1 / 6, 1 / 6])  # fmt: skip
    # within the cap: unchanged
    np.testing.assert_allclose(limit_change([0.5, 0.5], [0.4, 0.6], 2.0), [0.4, 0.6])
    # factor 1 freezes the weights
    np.testing.assert_allclose(limit_change([0.3, 0.7], [0.9, 0.1], 1.0), [0.3, 0.7])
    with pytest.raises(ValueError, match="max_change must be >= 1"):
        limit_change([0.5, 0.5], [0.5, 0.5], 0.5)


def test_steering_validates():
    for bad, match in (({"temperature": 0.0}, "temperature"), ({"gap": "diff"}, "gap"),
                       ({"min_share": 1.5}, "min_share"), ({"max_change": 0.9}, "max_change")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            Steering(**bad)


def test_next_weights_paper_steering_is_the_paper():
    r0 = next_weights("ddk", 0, None, STUDENT, TEACHER, 0.5, None, steering=PAPER)
    np.testing.assert_array_equal(r0, initial_weights(STUDENT, TEACHER))
    r1 = next_weights("ddk", 1, r0, STUDENT, TEACHER, 0.5, None, steering=PAPER)
    np.testing.assert_array_equal(r1, smooth_update(r0, STUDENT, TEACHER, 0.5))


def test_next_weights_steering_order():
    """Eq. 1/2 with gap and temperature, then the change cap (from uniform at interval 0),
    then the minimum share."""
    st = Steering(gap="log_ratio", temperature=0.5, max_change=1.5, min_share=0.9)
    x = np.log(np.array(STUDENT) / np.array(TEACHER)) / 0.5
    eq1 = np.exp(x) / np.exp(x).sum()
    expected0 = apply_min_share(limit_change(uniform_weights(3), eq1, 1.5), 0.9)
    r0 = next_weights("ddk", 0, None, STUDENT, TEACHER, 0.5, None, DOMAINS, st)
    np.testing.assert_allclose(r0, expected0, rtol=1e-12)
    assert r0.min() >= 0.9 / 3 - 1e-12  # the floor wins over the cap
    eq2 = 0.5 * r0 * np.exp(x) / (r0 * np.exp(x)).sum() + 0.5 / 3
    expected1 = apply_min_share(limit_change(r0, eq2, 1.5), 0.9)
    r1 = next_weights("ddk", 1, r0, STUDENT, TEACHER, 0.5, None, DOMAINS, st)
    np.testing.assert_allclose(r1, expected1, rtol=1e-12)
    # without a minimum share, the cap holds exactly
    capped = Steering(max_change=1.5)
    r0 = next_weights("ddk", 0, None, STUDENT, TEACHER, 0.5, None, DOMAINS, capped)
    assert np.all(r0 <= 1.5 / 3 + 1e-12) and np.all(r0 >= 1 / 4.5 - 1e-12)
    r1 = next_weights("ddk", 1, r0, STUDENT, TEACHER, 0.5, None, DOMAINS, capped)
    assert np.all(r1 <= 1.5 * r0 + 1e-12) and np.all(r1 >= r0 / 1.5 - 1e-12)


def test_next_weights_init_floor_and_no_smoothing_with_steering():
    st = Steering(init_floor=True, gap="log_ratio")
    r0 = next_weights("ddk", 0, None, STUDENT, TEACHER, 0.25, None, DOMAINS, st)
    np.testing.assert_allclose(r0, floored_initial_weights(STUDENT, TEACHER, 0.25, steering=st))
    # init_floor is interval 0 of ddk only; gap/temperature apply to ddk_no_smoothing too
    w = next_weights("ddk_no_smoothing", 4, r0, STUDENT, TEACHER, 0.25, None, DOMAINS, st)
    np.testing.assert_allclose(w, initial_weights(STUDENT, TEACHER, steering=st))


@pytest.mark.parametrize("method", ["kd", "cpt", "equal"])
def test_steering_does_not_touch_fixed_mixtures(method):
    st = Steering(init_floor=True, gap="log_ratio", min_share=1.0, max_change=1.1)
    w = next_weights(method, 2, [0.8, 0.1, 0.1], STUDENT, TEACHER, 0.5, FIXED, DOMAINS, st)
    np.testing.assert_allclose(w, FIXED if method != "equal" else [1 / 3] * 3)


@pytest.mark.parametrize("gap", ["ratio", "log_ratio"])
def test_trend_extrapolates_the_gap_like_the_naive_formula(gap):
    rng = np.random.default_rng(6)
    for _ in range(30):
        s, t = _random_case(rng, spread=3.0)
        prev = s * np.exp(rng.uniform(-0.5, 1.0, len(s)))
        beta, temp = float(rng.uniform(-2, 2)), float(rng.uniform(0.5, 3))
        st = Steering(gap=gap, trend=beta, temperature=temp)
        g, g0 = np.array(_naive_gap(s, t, gap, False)), np.array(_naive_gap(prev, t, gap, False))
        x = (g + beta * (g - g0)) / temp
        np.testing.assert_allclose(steering_exponent(s, t, None, st, prev), x, rtol=1e-12)
        np.testing.assert_allclose(steering_exponent(s, t, None, st), g / temp, rtol=1e-12)
        r, alpha = rng.dirichlet(np.ones(len(s))), float(rng.uniform())
        psi = r * np.exp(x)
        naive = alpha * psi / psi.sum() + (1 - alpha) / len(s)
        np.testing.assert_allclose(smooth_update(r, s, t, alpha, None, st, prev), naive, rtol=1e-12)


def test_trend_in_next_weights():
    # 'a' closed its gap from 8x to 4x since the last update, 'b' stayed at 3x: with a trend
    # of 1 the log-gaps ahead are 2 log 4 - log 8 = log 2 and log 3, so 'b' gets more
    st = Steering(gap="log_ratio", trend=1.0)
    prev, now, teacher = [8.0, 3.0], [4.0, 3.0], [1.0, 1.0]
    w = next_weights("ddk_no_smoothing", 1, None, now, teacher, 0.5, None, None, st, prev)
    np.testing.assert_allclose(w, [2 / 5, 3 / 5])
    plain = next_weights("ddk_no_smoothing", 1, None, now, teacher, 0.5, None, None,
                         Steering(gap="log_ratio"), prev)  # fmt: skip
    np.testing.assert_allclose(plain, [4 / 7, 3 / 7])
    # interval 0 has no previous evaluation, whatever is passed
    w0 = next_weights("ddk", 0, None, now, teacher, 0.5, None, None, st, prev)
    np.testing.assert_allclose(w0, [4 / 7, 3 / 7])
    r1 = next_weights("ddk", 1, [0.5, 0.5], now, teacher, 0.5, None, None, st, prev)
    np.testing.assert_allclose(r1, 0.5 * np.array([2 / 5, 3 / 5]) + 0.25)
    with pytest.raises(ValueError, match="trend"):
        Steering(trend=float("inf"))
    # a negative trend rewards progress: 'a' (closing) now pulls more than 'b' (standing)
    progress = Steering(gap="log_ratio", trend=-1.0)
    w = next_weights("ddk_no_smoothing", 1, None, now, teacher, 0.5, None, None, progress, prev)
    np.testing.assert_allclose(w, [8 / 11, 3 / 11])  # log 4 - (log 4 - log 8) = log 8 vs log 3


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 2.0])
def test_prior_power_matches_naive_pi_to_the_beta_times_exp(power):
    """distill.prior_power: Eq. 1 and Eq. 2 with weights going as pi^beta * exp(g / T)."""
    rng = np.random.default_rng(7)
    for _ in range(30):
        s, t = _random_case(rng, spread=3.0)
        tokens = rng.integers(1, 10**6, len(s)).astype(float)
        temp = float(rng.uniform(0.5, 3))
        st = Steering(gap="log_ratio", temperature=temp, prior_power=power, prior=tuple(tokens))
        pi = tokens / tokens.sum()
        q = pi**power * np.exp(np.array(_naive_gap(s, t, "log_ratio", False)) / temp)
        np.testing.assert_allclose(initial_weights(s, t, steering=st), q / q.sum(), rtol=1e-10)
        r, alpha = rng.dirichlet(np.ones(len(s))), float(rng.uniform())
        naive = alpha * r * q / (r * q).sum() + (1 - alpha) / len(s)
        np.testing.assert_allclose(smooth_update(r, s, t, alpha, steering=st), naive, rtol=1e-10)


def test_prior_power_by_hand_and_errors():
    # equal gaps: Eq. 1 is the natural mix at beta = 1, its square root at beta = 0.5
    s, t, tokens = [3.0, 3.0, 3.0], [1.0, 1.0, 1.0], (600.0, 300.0, 100.0)
    one = Steering(prior_power=1.0, prior=tokens)
    np.testing.assert_allclose(initial_weights(s, t, steering=one), [0.6, 0.3, 0.1])
    half = Steering(prior_power=0.5, prior=tokens)
    np.testing.assert_allclose(initial_weights(s, t, steering=half),
                               np.sqrt(tokens) / np.sqrt(tokens).sum())  # fmt: skip
    # beta = 0 is the paper whatever the prior; a domain with no tokens gets only the floor
    np.testing.assert_array_equal(
        initial_weights(s, [1.0, 2.0, 4.0], steering=Steering(prior=tokens)),
        initial_weights(s, [1.0, 2.0, 4.0]),
    )
    empty = Steering(prior_power=1.0, prior=(1.0, 1.0, 0.0), init_floor=True)
    r0 = next_weights("ddk", 0, None, s, t, 0.5, None, None, empty)
    np.testing.assert_allclose(r0, [0.25 + 0.5 / 3, 0.25 + 0.5 / 3, 0.5 / 3])
    with pytest.raises(ValueError, match="prior_power must be >= 0"):
        Steering(prior_power=-1.0)
    with pytest.raises(ValueError, match="needs the natural share"):
        initial_weights(s, t, steering=Steering(prior_power=1.0))
    with pytest.raises(ValueError, match="2 entries for 3 domains"):
        prior_tilt([1.0, 2.0], 1.0, 3)
    with pytest.raises(ValueError, match="not all zero"):
        prior_tilt([0.0, 0.0], 1.0, 2)


def _naive_worst_focus(x, prior=None, floor=None):
    """distill.focus: worst written out: the domain of the largest x gets m / (m + N - 1)
    (m = e^(x_max - median x)), at least (1 + floor) x its natural share; the rest equally."""
    x = list(x)
    n = len(x)
    worst = x.index(max(x))
    ordered = sorted(x)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    m = math.exp(x[worst] - median)
    share = m / (m + n - 1)
    if floor is not None:
        share = max(share, min(1.0, (1 + floor) * prior[worst] / sum(prior)))
    return [share if i == worst else (1 - share) / (n - 1) for i in range(n)]


def test_worst_focus_matches_the_naive_rule():
    rng = np.random.default_rng(11)
    for _ in range(200):
        n = int(rng.integers(2, 9))
        x = rng.normal(0, 2, n)
        prior = rng.integers(0, 10**6, n).astype(float) + (rng.uniform() < 0.5)
        floor = None if rng.uniform() < 0.3 else float(rng.uniform(0, 2))
        got = worst_focus_weights(x, prior, floor)
        np.testing.assert_allclose(got, _naive_worst_focus(x, prior, floor), rtol=1e-12)
        assert got.sum() == pytest.approx(1.0)
        # only the worst domain moves off an equal split of the rest
        others = np.delete(got, int(np.argmax(x)))
        assert np.ptp(others) < 1e-15 and got.max() >= 1 / n - 1e-15


def test_worst_focus_by_hand_in_next_weights():
    """Ratios 9, 1, 1, 4 at temperature 2 on the log ratio: the median log ratio is log 2
    (between log 1 and log 4), so m = sqrt(9 / 2)."""
    s, t = [9.0, 1.0, 1.0, 4.0], [1.0, 1.0, 1.0, 1.0]
    st = Steering(gap="log_ratio", temperature=2.0, focus="worst")
    m = math.sqrt(9 / 2)
    expect = [m / (m + 3)] + [1 / (m + 3)] * 3
    for method, interval in (("ddk", 0), ("ddk", 3), ("ddk_no_smoothing", 1)):
        w = next_weights(method, interval, [0.7, 0.1, 0.1, 0.1], s, t, 0.5, None, None, st)
        np.testing.assert_allclose(w, expect, rtol=1e-12)  # no memory, no alpha: same each time
    # the natural floor: 40 % of the tokens -> at least 44 % with natural_floor 0.1
    floored = Steering(gap="log_ratio", temperature=2.0, focus="worst", natural_floor=0.1,
                       prior=(400.0, 300.0, 200.0, 100.0))  # fmt: skip
    w = next_weights("ddk", 2, None, s, t, 0.5, None, None, floored)
    np.testing.assert_allclose(w, [0.44, 0.56 / 3, 0.56 / 3, 0.56 / 3])
    # a domain that lags no more than the median gets the uniform share: all equal
    np.testing.assert_allclose(worst_focus_weights([0.0, 0.0, 0.0]), [1 / 3] * 3)
    assert worst_focus_weights([5.0]).tolist() == [1.0]
    with pytest.raises(ValueError, match="natural_floor needs focus 'worst'"):
        Steering(natural_floor=0.1)
    with pytest.raises(ValueError, match="focus must be"):
        Steering(focus="best")
    with pytest.raises(ValueError, match="needs the natural share"):
        worst_focus_weights([1.0, 2.0], None, 0.1)


def test_uniform_intervals_delay_the_steering_and_then_start_it_as_at_interval_0():
    s, t = [9.0, 1.0, 1.0, 4.0], [1.0, 1.0, 1.0, 1.0]
    late = Steering(uniform_intervals=2)
    for interval in (0, 1):
        w = next_weights("ddk", interval, None, s, t, 0.5, None, None, late)
        np.testing.assert_array_equal(w, [0.25] * 4)
    # interval 2 is Eq. 1 (no previous weights needed), interval 3 Eq. 2 on it
    r2 = next_weights("ddk", 2, None, s, t, 0.5, None, None, late)
    np.testing.assert_allclose(r2, initial_weights(s, t), rtol=1e-12)
    r3 = next_weights("ddk", 3, r2, s, t, 0.5, None, None, late)
    np.testing.assert_allclose(r3, smooth_update(r2, s, t, 0.5), rtol=1e-12)
    focused = Steering(gap="log_ratio", focus="worst", uniform_intervals=1)
    np.testing.assert_array_equal(next_weights("ddk", 0, None, s, t, 0.5, None, None, focused),
                                  [0.25] * 4)  # fmt: skip
    m = 9.0 / 2.0  # exp(log 9 - median log ratio log 2), temperature 1
    np.testing.assert_allclose(
        next_weights("ddk", 1, None, s, t, 0.5, None, None, focused),
        [m / (m + 3)] + [1 / (m + 3)] * 3,
    )
    with pytest.raises(ValueError, match="uniform_intervals must be"):
        Steering(uniform_intervals=-1)
    with pytest.raises(ValueError, match="uniform_intervals must be"):
        Steering(uniform_intervals=True)
    # the perplexities are checked during the uniform intervals too
    with pytest.raises(ValueError, match="student perplexity must be finite"):
        next_weights("ddk", 0, None, [float("nan"), 1.0, 1.0, 1.0], t, 0.5, None, None, late)
