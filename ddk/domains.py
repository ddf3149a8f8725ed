"""Domain sampling weights: DDK's Eq. 1 and Eq. 2 and the fixed mixtures of the baselines.

All functions are pure, take array-likes and return new ``float64`` numpy arrays.

Numerics
--------
The perplexity ratio ``ℓ_S/ℓ_T`` can be far above the paper's 1.2–1.8: a freshly
initialised student has a perplexity near the vocabulary size, so ratios of 100+
occur and ``exp(ratio)`` overflows float32 beyond 88 (and float64 beyond 709).
Eq. 1 and Eq. 2 are therefore computed in log space in float64::

    r0       = exp(x - logsumexp(x)),              x = ℓ_S / ℓ_T             (Eq. 1)
    log ψ    = log r + x
    r'       = α · exp(log ψ - logsumexp(log ψ)) + (1 - α) / N             (Eq. 2)

so any finite ratio (1e6 included) works. A weight of exactly 0 in ``r`` gives
``log r = -inf`` and contributes nothing to ``ψ``; that domain gets the floor
``(1 - α) / N``.

Steering beyond the paper (all off by default, see :class:`Steering`)
---------------------------------------------------------------------
The paper's ratios were 1.2–1.8. Ratios of 50–400 (a student far behind on one domain)
make Eq. 1 one-hot and let Eq. 2 pile weight on one domain. Each knob below changes one
step of the recipe and defaults to the paper's behaviour::

    g        = ℓ_S/ℓ_T                       gap="ratio" (paper)
             = log ℓ_S - log ℓ_T              gap="log_ratio": the cross-entropy difference,
                                              DoReMi's / Sheared-LLaMA's excess loss
    g        = max(g, g(ℓ_S = ℓ_T))          clip_gap: no push once the student matches
                                              the teacher (DoReMi clips excess loss at 0)
    g        = g + β·(g - g_prev)            trend = β: the gap extrapolated one interval
                                              ahead from its change since the last
                                              evaluation (optimistic mirror descent: β = 1);
                                              β < 0 rewards progress instead: a domain whose
                                              gap closed fast pulls more (learning progress)
    r        = 1/N before interval U          uniform_intervals = U: a student's first gaps
                                              mostly measure what it never saw, which closes
                                              within an interval under any mixture; Eq. 1
                                              (or focus) starts at interval U as at 0
    x        = g / temperature               temperature on Eq. 1's and Eq. 2's softmax
    x        = x + β·log π                   prior_power = β, π = each domain's share of the
                                              training tokens (the natural mix): the weights
                                              go as π^β·exp(g/T), so a large domain that lags
                                              gets more than a small one with the same gap
    r0       = softmax(x)  (+ Eq. 2's floor with init_floor)
    r'       = Eq. 2 with x
    r'       = worst focus                   focus="worst", instead of Eq. 1/2: only the
                                              largest x (the domain that lags most) moves,
                                              to m / (m + N - 1), m = exp(x_worst - median x);
                                              with natural_floor = ε at least (1 + ε)·π_worst;
                                              the others share the rest equally (no α or
                                              init_floor; recomputed at every update; meant
                                              for gap="log_ratio": raw ratios of 50+ give the
                                              worst domain every sample)
    r'       ∈ [r/c, c·r]                    max_change = c (interval 0: relative to 1/N)
    r'       ≥ min_share / N                 min_share


max_change and min_share are projections: ``w_i = clip(s·p_i, lo_i, hi_i)`` with the one scale
``s`` that makes the weights sum to 1 (:func:`bounded_rescale`), so the domains that
are not clipped keep their proportions.

Policy for bad perplexities
---------------------------
A perplexity that is NaN, infinite, zero or negative (student or teacher) means the
evaluation went wrong (for example a diverged student). It would silently poison
every weight, so it raises ``ValueError`` with a one-line message naming the
domain(s) — by name when ``domains`` is given, by index otherwise — instead of
returning weights. A ratio that overflows float64 (e.g. ``1e300 / 1e-300``) is
rejected the same way. A finite but huge ratio is fine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ddk.methods import METHODS as _METHOD_TABLE
from ddk.methods import method_spec

__all__ = [
    "METHODS",
    "PAPER",
    "Steering",
    "perplexity_ratio",
    "domain_gap",
    "steering_exponent",
    "prior_tilt",
    "worst_focus_weights",
    "bounded_rescale",
    "limit_change",
    "apply_min_share",
    "initial_weights",
    "floored_initial_weights",
    "smooth_update",
    "fixed_mixture",
    "uniform_weights",
    "next_weights",
]

#: Every value of ``distill.method`` that :func:`next_weights` understands (ddk.methods).
METHODS = tuple(_METHOD_TABLE)

Gap = Literal["ratio", "log_ratio"]
Focus = Literal["all", "worst"]


@dataclass(frozen=True)
class Steering:
    """How DDK turns perplexities into weights, beyond α; the defaults are the paper's Eq. 1/2.

    See the module docstring for the formulas. ``max_change`` None means no cap.
    """

    init_floor: bool = False
    temperature: float = 1.0
    gap: Gap = "ratio"
    clip_gap: bool = False
    min_share: float = 0.0
    max_change: float | None = None
    trend: float = 0.0
    prior_power: float = 0.0
    prior: tuple[float, ...] | None = None
    """π: the natural share of each domain (any scale; normalised), needed when prior_power > 0
    or natural_floor is set."""
    focus: Focus = "all"
    natural_floor: float | None = None
    uniform_intervals: int = 0
    """Intervals sampled uniformly before the steering starts (then counted from 0)."""

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.gap not in ("ratio", "log_ratio"):
            raise ValueError(f"gap must be 'ratio' or 'log_ratio', got {self.gap!r}")
        if not 0.0 <= self.min_share <= 1.0:
            raise ValueError(f"min_share must be in [0, 1], got {self.min_share}")
        if self.max_change is not None and not self.max_change >= 1.0:
            raise ValueError(f"max_change must be >= 1, got {self.max_change}")
        if not np.isfinite(self.trend):
            raise ValueError(f"trend must be finite, got {self.trend}")
        if not self.prior_power >= 0.0:
            raise ValueError(f"prior_power must be >= 0, got {self.prior_power}")
        if isinstance(self.uniform_intervals, bool) or not (
            isinstance(self.uniform_intervals, int) and self.uniform_intervals >= 0
        ):
            raise ValueError(f"uniform_intervals must be an int >= 0, got {self.uniform_intervals}")
        if self.focus not in ("all", "worst"):
            raise ValueError(f"focus must be 'all' or 'worst', got {self.focus!r}")
        if self.natural_floor is not None and not (
            self.focus == "worst" and self.natural_floor >= 0.0
        ):
            raise ValueError("natural_floor needs focus 'worst' and a value >= 0")

    @property
    def needs_prior(self) -> bool:
        """Whether the weights read the natural shares (``prior``)."""
        return bool(self.prior_power) or self.natural_floor is not None


#: The paper's DDK: every knob off.
PAPER = Steering()


def _domain_label(i: int, domains: Sequence[str] | None) -> str:
    if domains is not None and i < len(domains):
        return f"{i} ({domains[i]!r})"
    return str(i)


def _as_vector(values, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty: need at least one domain")
    return arr


def _check_domains(domains: Sequence[str] | None, n: int) -> None:
    if domains is not None and len(domains) != n:
        raise ValueError(f"got {len(domains)} domain names for {n} domains")


def _check_perplexities(ppl: np.ndarray, who: str, domains: Sequence[str] | None) -> None:
    bad = np.flatnonzero(~np.isfinite(ppl) | ~(ppl > 0))
    if bad.size:
        where = ", ".join(f"domain {_domain_label(int(i), domains)} = {ppl[i]!r}" for i in bad)
        raise ValueError(
            f"{who} perplexity must be finite and > 0, got {where}; "
            "refusing to compute domain weights from it"
        )


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    if not np.isfinite(m):
        # All -inf (every weight zero) or +inf: there is no distribution to normalise.
        raise ValueError("cannot normalise domain weights: every log-weight is -inf or +inf")
    return m + float(np.log(np.sum(np.exp(x - m))))


def _softmax_log(x: np.ndarray) -> np.ndarray:
    """``exp(x - logsumexp(x))``, renormalised so the sum is 1 to rounding."""
    p = np.exp(x - _logsumexp(x))
    return p / p.sum()


def perplexity_ratio(
    student_ppl: Sequence[float] | np.ndarray,
    teacher_ppl: Sequence[float] | np.ndarray,
    domains: Sequence[str] | None = None,
) -> np.ndarray:
    """Per-domain ``ℓ_S / ℓ_T`` in float64.

    Raises ``ValueError`` (one line, naming the domain) when a perplexity is NaN,
    infinite, zero or negative, when the ratio overflows, or when the lengths differ.
    """
    s = _as_vector(student_ppl, "student perplexities")
    t = _as_vector(teacher_ppl, "teacher perplexities")
    if s.shape != t.shape:
        raise ValueError(f"got {s.size} student perplexities but {t.size} teacher perplexities")
    _check_domains(domains, s.size)
    _check_perplexities(s, "student", domains)
    _check_perplexities(t, "teacher", domains)
    with np.errstate(over="ignore"):
        ratio = s / t
    bad = np.flatnonzero(~np.isfinite(ratio))
    if bad.size:
        where = ", ".join(f"domain {_domain_label(int(i), domains)}" for i in bad)
        raise ValueError(f"perplexity ratio student/teacher overflows float64 for {where}")
    return ratio


def domain_gap(
    student_ppl: Sequence[float] | np.ndarray,
    teacher_ppl: Sequence[float] | np.ndarray,
    gap: Gap = "ratio",
    clip: bool = False,
    domains: Sequence[str] | None = None,
) -> np.ndarray:
    """What Eq. 1/2 exponentiate: ``ℓ_S/ℓ_T`` (``gap="ratio"``, the paper) or
    ``log ℓ_S - log ℓ_T`` (``"log_ratio"``: student minus teacher cross-entropy in nats).
    ``clip`` raises a gap below "student = teacher" (ratio 1, log-ratio 0) to that value."""
    ratio = perplexity_ratio(student_ppl, teacher_ppl, domains)
    if gap == "ratio":
        g, even = ratio, 1.0
    elif gap == "log_ratio":
        # log of each perplexity, not of the ratio: exact when the ratio underflows
        g, even = (
            np.log(np.asarray(student_ppl, np.float64))
            - np.log(np.asarray(teacher_ppl, np.float64)),
            0.0,
        )
    else:
        raise ValueError(f"gap must be 'ratio' or 'log_ratio', got {gap!r}")
    return np.maximum(g, even) if clip else g


def steering_exponent(
    student_ppl: Sequence[float] | np.ndarray,
    teacher_ppl: Sequence[float] | np.ndarray,
    domains: Sequence[str] | None = None,
    steering: Steering = PAPER,
    previous_student_ppl: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """The per-domain exponent of Eq. 1 and Eq. 2: ``x = g / temperature + β log π``, where
    ``g`` is :func:`domain_gap`, extrapolated by ``steering.trend`` from the gap of
    ``previous_student_ppl`` (the last evaluation) when that is given, and ``β log π`` is
    :func:`prior_tilt` (``steering.prior_power``; 0 by default). The paper: ``ℓ_S/ℓ_T``."""
    g = domain_gap(student_ppl, teacher_ppl, steering.gap, steering.clip_gap, domains)
    if steering.trend and previous_student_ppl is not None:
        before = domain_gap(
            previous_student_ppl, teacher_ppl, steering.gap, steering.clip_gap, domains
        )
        g = g + steering.trend * (g - before)
    x = g / steering.temperature
    if steering.prior_power:
        if steering.prior is None:
            raise ValueError("prior_power > 0 needs the natural share of every domain (prior)")
        x = x + prior_tilt(steering.prior, steering.prior_power, x.size)
    return x


def prior_tilt(shares: Sequence[float] | np.ndarray, power: float, n: int) -> np.ndarray:
    """``β · log π``, with ``π = shares / Σ shares``: added to Eq. 1/2's exponent it makes the
    weights go as ``π^β · exp(x)``. A domain with share 0 gets ``-inf`` (weight 0 before
    Eq. 2's floor) when ``β > 0``; ``β = 0`` adds nothing."""
    pi = _natural_shares(shares, n)
    if power == 0:
        return np.zeros(n)
    with np.errstate(divide="ignore"):
        return power * np.log(pi)


def _natural_shares(shares: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """``π = shares / Σ shares`` for ``n`` domains; a one-line ``ValueError`` for the wrong
    length, a value that is not finite or negative, or all zeros."""
    pi = _as_vector(shares, "prior shares")
    if pi.size != n:
        raise ValueError(f"prior shares have {pi.size} entries for {n} domains")
    if not np.all(np.isfinite(pi)) or np.any(pi < 0) or not pi.sum() > 0:
        raise ValueError(f"prior shares must be finite, >= 0 and not all zero, got {pi.tolist()}")
    return pi / pi.sum()


def initial_weights(
    student_ppl: Sequence[float] | np.ndarray,
    teacher_ppl: Sequence[float] | np.ndarray,
    domains: Sequence[str] | None = None,
    steering: Steering = PAPER,
    previous_student_ppl: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Eq. 1: ``r0 = softmax(ℓ_S / ℓ_T)``, computed as ``exp(x - logsumexp(x))`` in float64
    (``x`` from :func:`steering_exponent`; the paper's by default)."""
    x = steering_exponent(student_ppl, teacher_ppl, domains, steering, previous_student_ppl)
    return _softmax_log(x)


def floored_initial_weights(
    student_ppl: Sequence[float] | np.ndarray,
    teacher_ppl: Sequence[float] | np.ndarray,
    alpha: float,
    domains: Sequence[str] | None = None,
    steering: Steering = PAPER,
) -> np.ndarray:
    """Eq. 1 with Eq. 2's floor (``distill.init_floor``, not in the paper):
    ``r0 = α · softmax(ℓ_S/ℓ_T) + (1 - α)/N``, so no domain starts with (almost) no rows.
    This is Eq. 2 applied to a uniform prior."""
    alpha = _check_alpha(alpha)
    r0 = initial_weights(student_ppl, teacher_ppl, domains, steering)
    return alpha * r0 + (1.0 - alpha) / r0.size


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


def _check_weights(weights, n: int, what: str = "weights") -> np.ndarray:
    r = _as_vector(weights, what)
    if r.size != n:
        raise ValueError(f"{what} has {r.size} entries for {n} domains")
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError(f"{what} must be finite and >= 0, got {r.tolist()}")
    if not np.any(r > 0):
        raise ValueError(f"{what} are all zero")
    return r


def smooth_update(
    weights: Sequence[float] | np.ndarray,
    student_ppl: Sequence[float] | np.ndarray,
    teacher_ppl: Sequence[float] | np.ndarray,
    alpha: float,
    domains: Sequence[str] | None = None,
    steering: Steering = PAPER,
    previous_student_ppl: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Eq. 2 (factor smooth updating), in log space.

    ``log ψ = log r + ℓ_S/ℓ_T``; ``r' = α ψ/Σψ + (1 - α)/N``. ``weights`` must be
    finite, ``>= 0`` and not all zero (its scale does not matter: ψ is normalised).
    A zero weight stays at the floor ``(1 - α)/N`` instead of producing NaN. Every
    returned weight is ``>= (1 - α)/N`` and the weights sum to 1 (to rounding).
    :func:`steering_exponent` replaces ``ℓ_S/ℓ_T`` in ``ψ`` (the same by default).
    """
    alpha = _check_alpha(alpha)
    x = steering_exponent(student_ppl, teacher_ppl, domains, steering, previous_student_ppl)
    r = _check_weights(weights, x.size)
    with np.errstate(divide="ignore"):
        log_psi = np.log(r) + x
    return alpha * _softmax_log(log_psi) + (1.0 - alpha) / x.size


def worst_focus_weights(
    x: Sequence[float] | np.ndarray,
    prior: Sequence[float] | np.ndarray | None = None,
    natural_floor: float | None = None,
) -> np.ndarray:
    """``distill.focus: worst``: only the domain with the largest exponent ``x`` (the largest
    gap; the lowest index on ties) gets more than the others. Its share is
    ``s = m / (m + N - 1)`` with ``m = exp(x_worst - median(x))``: the uniform share when it
    lags no more than the median domain, growing with how far it lags. With ``natural_floor``
    ε, ``s`` is at least ``(1 + ε)·π_worst`` (``π = prior / Σ prior``, the natural shares), so
    the domain that lags most never gets less than a natural mixture (KD's) gives it. The
    others share ``1 - s`` equally: tilting every lagging domain, as Eq. 1 does, costs the
    domains that respond without moving the worst ratio."""
    x = _as_vector(x, "steering exponents")
    n = x.size
    if n == 1:
        return np.ones(1)
    worst = int(np.argmax(x))
    m = float(np.exp(min(x[worst] - float(np.median(x)), 700.0)))
    share = m / (m + n - 1)
    if natural_floor is not None:
        if prior is None:
            raise ValueError("natural_floor needs the natural share of every domain (prior)")
        pi = _natural_shares(prior, n)
        share = max(share, min(1.0, (1.0 + natural_floor) * pi[worst]))
    w = np.full(n, (1.0 - share) / (n - 1))
    w[worst] = share
    return w


def bounded_rescale(weights, lower, upper) -> np.ndarray:
    """``w_i = clip(s · p_i, lower_i, upper_i)`` with the one ``s >= 0`` that makes ``Σ w = 1``.

    ``p = weights`` (``>= 0``, not all zero; its scale does not matter). The domains left
    unclipped keep their proportions. Needs ``lower <= upper``, ``Σ lower <= 1 <= Σ upper``.
    A zero ``p_i`` is treated as the smallest positive float, so it can still be raised to
    its upper bound when the others cannot take the mass. Exact: ``Σ clip(s p, lo, hi)`` is
    piecewise linear in ``s``, so the segment holding 1 is found among the breakpoints and
    solved in closed form.
    """
    p = _check_weights(weights, len(np.atleast_1d(weights)))
    lo = np.asarray(lower, np.float64) * np.ones_like(p)
    hi = np.asarray(upper, np.float64) * np.ones_like(p)
    if np.any(lo > hi) or np.any(lo < 0) or not np.all(np.isfinite(hi)):
        raise ValueError("bounds must satisfy 0 <= lower <= upper < inf")
    if lo.sum() > 1 + 1e-12 or hi.sum() < 1 - 1e-12:
        raise ValueError(f"no weights within the bounds sum to 1 (lower sums to {lo.sum()}, "
                         f"upper to {hi.sum()})")  # fmt: skip
    p = np.maximum(p / p.sum(), np.finfo(np.float64).tiny)

    def total(scale: float) -> float:
        return float(np.clip(scale * p, lo, hi).sum())

    points = np.unique(np.concatenate([lo / p, hi / p]))
    k = int(np.searchsorted([total(b) for b in points], 1.0))  # first breakpoint with Σ >= 1
    if k == 0:  # Σ lower already 1 (to rounding)
        return lo / lo.sum() if lo.sum() > 0 else lo
    if k == len(points):  # Σ upper is 1 (to rounding)
        return hi / hi.sum()
    a, b = points[k - 1], points[k]
    # between two breakpoints every domain is pinned or free the same way
    mid = np.clip(0.5 * (a + b) * p, lo, hi)
    free = (mid > lo) & (mid < hi)
    pinned = float(mid[~free].sum())
    scale = (1.0 - pinned) / p[free].sum() if free.any() else a
    w = np.clip(scale * p, lo, hi)
    return w / w.sum()


def limit_change(previous, proposed, max_change: float) -> np.ndarray:
    """Keep every weight within a factor ``max_change`` of ``previous`` (``r/c <= r' <= c·r``),
    as close in proportion to ``proposed`` as that allows (:func:`bounded_rescale`)."""
    if not max_change >= 1.0:
        raise ValueError(f"max_change must be >= 1, got {max_change}")
    prev = _check_weights(previous, len(np.atleast_1d(previous)), "previous weights")
    prev = prev / prev.sum()
    return bounded_rescale(proposed, prev / max_change, prev * max_change)


def apply_min_share(weights, min_share: float) -> np.ndarray:
    """Raise every weight to at least ``min_share / N`` (a fraction of the uniform share),
    taking the mass from the others in proportion (:func:`bounded_rescale`)."""
    if not 0.0 <= min_share <= 1.0:
        raise ValueError(f"min_share must be in [0, 1], got {min_share}")
    w = _check_weights(weights, len(np.atleast_1d(weights)))
    return bounded_rescale(w, min_share / w.size, 1.0)


def uniform_weights(n: int) -> np.ndarray:
    """``[1/n] * n`` (the "equal" sampling ablation)."""
    if n < 1:
        raise ValueError(f"need at least one domain, got {n}")
    return np.full(n, 1.0 / n, dtype=np.float64)


def fixed_mixture(
    domains: Sequence[str],
    spec: str | Mapping[str, float],
    natural_tokens: Mapping[str, int] | None = None,
) -> np.ndarray:
    """A fixed domain mixture (for ``kd`` / ``cpt``), in the order of ``domains``, summing to 1.

    ``spec`` is ``"natural"`` (proportional to ``natural_tokens[domain]``, the training
    token count of each domain), ``"uniform"``, or a dict ``{domain: weight}``: it may
    name only domains in ``domains``, weights must be finite and ``>= 0`` and not all
    zero; domains it leaves out get weight 0. Problems raise a one-line ``ValueError``.
    """
    domains = list(domains)
    if not domains:
        raise ValueError("fixed mixture: need at least one domain")
    dupes = sorted({d for d in domains if domains.count(d) > 1})
    if dupes:
        raise ValueError(f"fixed mixture: duplicate domain name(s) {dupes}")
    n = len(domains)

    if isinstance(spec, str):
        if spec == "uniform":
            return uniform_weights(n)
        if spec == "natural":
            return _natural_mixture(domains, natural_tokens)
        raise ValueError(
            f"fixed mixture must be 'natural', 'uniform' or a {{domain: weight}} dict, got {spec!r}"
        )

    if not isinstance(spec, Mapping):
        raise ValueError(
            f"fixed mixture must be 'natural', 'uniform' or a {{domain: weight}} dict, "
            f"got {type(spec).__name__}"
        )
    return _given_mixture(domains, spec)


def _natural_mixture(domains: list[str], natural_tokens: Mapping[str, int] | None) -> np.ndarray:
    """Weights proportional to each domain's training token count."""
    if natural_tokens is None:
        raise ValueError("fixed mixture 'natural' needs the token count of every domain")
    counts = []
    for d in domains:
        if d not in natural_tokens:
            raise ValueError(f"fixed mixture 'natural': no token count for domain {d!r}")
        c = float(natural_tokens[d])
        if not np.isfinite(c) or c < 0:
            raise ValueError(
                f"fixed mixture 'natural': token count of domain {d!r} must be >= 0, got {c}"
            )
        counts.append(c)
    w = np.asarray(counts, dtype=np.float64)
    if w.sum() <= 0:
        raise ValueError("fixed mixture 'natural': every domain has 0 tokens")
    return w / w.sum()


def _given_mixture(domains: list[str], spec: Mapping[str, float]) -> np.ndarray:
    """A user's {domain: weight}, normalised; domains it leaves out get 0."""
    index = {d: i for i, d in enumerate(domains)}
    w = np.zeros(len(domains), dtype=np.float64)
    for d, value in spec.items():
        if d not in index:
            raise ValueError(f"fixed mixture names unknown domain {d!r}; known: {domains}")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"fixed mixture weight of domain {d!r} must be a number, got {value!r}"
            ) from None
        if not np.isfinite(v) or v < 0:
            raise ValueError(
                f"fixed mixture weight of domain {d!r} must be finite and >= 0, got {v}"
            )
        w[index[d]] = v
    if w.sum() <= 0:
        raise ValueError("fixed mixture weights are all zero")
    return w / w.sum()


def next_weights(
    method: str,
    interval: int,
    weights: Sequence[float] | np.ndarray | None,
    student_ppl: Sequence[float] | np.ndarray | None,
    teacher_ppl: Sequence[float] | np.ndarray | None,
    alpha: float,
    fixed: Sequence[float] | np.ndarray | None,
    domains: Sequence[str] | None = None,
    steering: Steering = PAPER,
    previous_student_ppl: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """The domain weights to sample interval ``interval`` with — one dispatch for every method.

    ==================== =========================================================
    method               weights for interval ``t``
    ==================== =========================================================
    ``ddk``              ``t == 0``: Eq. 1 (``initial_weights``; ``weights`` is
                         ignored and may be None). ``t > 0``: Eq. 2
                         (``smooth_update(weights, ...)`` with ``weights = r_{t-1}``).
    ``ddk_no_smoothing`` Eq. 1 from the current perplexities at every ``t``.
    ``kd``, ``cpt``      ``fixed`` (the precomputed :func:`fixed_mixture`), copied;
                         perplexities are not used and may be None.
    ``equal``            uniform ``1/N``; perplexities are not used.
    ==================== =========================================================

    ``N`` is taken from ``domains``, the perplexities, ``weights`` or ``fixed``
    (whichever is given first). Bad perplexities raise ``ValueError`` for the DDK
    methods (see the module docstring). ``steering`` applies to the two DDK methods only:
    ``init_floor`` makes ``ddk``'s interval 0 :func:`floored_initial_weights`; gap, clip and
    temperature change Eq. 1/2's exponent, and ``trend`` with ``previous_student_ppl`` (the
    student's perplexities at the last update; None at interval 0); then ``max_change`` caps the change from
    ``weights`` (uniform at interval 0 or when ``weights`` is None) and ``min_share`` floors
    the result (in that order, so the floor wins).
    """
    if interval < 0:
        raise ValueError(f"interval must be >= 0, got {interval}")
    rule = method_spec(method).weights

    if rule in ("eq1_then_eq2", "eq1_every_interval"):
        return _ddk_weights(
            method, rule, interval, weights, student_ppl, teacher_ppl, alpha, domains, steering,
            previous_student_ppl,
        )  # fmt: skip
    n = None
    for candidate in (domains, teacher_ppl, student_ppl, weights, fixed):
        if candidate is not None:
            n = len(candidate)
            break
    if n is None:
        raise ValueError(f"method {method!r}: cannot tell the number of domains")
    if rule == "uniform":
        return uniform_weights(n)
    # rule == "fixed": kd, cpt
    if fixed is None:
        raise ValueError(f"method {method!r} needs a fixed mixture")
    w = _check_weights(fixed, n, "fixed mixture")
    if abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"fixed mixture must sum to 1, sums to {w.sum()}")
    return w.copy()


def _ddk_weights(
    method, rule, interval, weights, student_ppl, teacher_ppl, alpha, domains, steering, previous
) -> np.ndarray:
    """``next_weights`` for the two DDK methods: Eq. 1 / Eq. 2 with the steering keys.
    ``steering.uniform_intervals`` U: uniform before interval U (the perplexities still
    checked), then everything below as if interval U were 0. ``steering.focus == "worst"``:
    :func:`worst_focus_weights` at every interval instead of Eq. 1/2. Then the two
    projections (max_change, min_share)."""
    if interval < steering.uniform_intervals:
        return uniform_weights(perplexity_ratio(student_ppl, teacher_ppl, domains).size)
    interval -= steering.uniform_intervals  # the steering starts as at interval 0
    before = previous if interval > 0 else None
    if steering.focus == "worst":
        x = steering_exponent(student_ppl, teacher_ppl, domains, steering, before)
        new = worst_focus_weights(x, steering.prior, steering.natural_floor)
    elif rule == "eq1_every_interval":
        new = initial_weights(student_ppl, teacher_ppl, domains, steering, before)
    elif interval == 0 and steering.init_floor:
        new = floored_initial_weights(student_ppl, teacher_ppl, alpha, domains, steering)
    elif interval == 0:
        new = initial_weights(student_ppl, teacher_ppl, domains, steering)
    elif weights is None:
        raise ValueError(f"method {method!r} needs the previous interval's weights after 0")
    else:
        new = smooth_update(weights, student_ppl, teacher_ppl, alpha, domains, steering, before)
    if steering.max_change is not None:
        start = weights if interval > 0 and weights is not None else uniform_weights(new.size)
        new = limit_change(start, new, steering.max_change)
    if steering.min_share > 0:
        new = apply_min_share(new, steering.min_share)
    return new
