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

import numpy as np

from ddk.methods import METHODS as _METHOD_TABLE
from ddk.methods import method_spec

__all__ = [
    "METHODS",
    "perplexity_ratio",
    "initial_weights",
    "floored_initial_weights",
    "smooth_update",
    "fixed_mixture",
    "uniform_weights",
    "next_weights",
]

#: Every value of ``distill.method`` that :func:`next_weights` understands (ddk.methods).
METHODS = tuple(_METHOD_TABLE)


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


def initial_weights(
    student_ppl: Sequence[float] | np.ndarray,
    teacher_ppl: Sequence[float] | np.ndarray,
    domains: Sequence[str] | None = None,
) -> np.ndarray:
    """Eq. 1: ``r0 = softmax(ℓ_S / ℓ_T)``, computed as ``exp(x - logsumexp(x))`` in float64."""
    return _softmax_log(perplexity_ratio(student_ppl, teacher_ppl, domains))


def floored_initial_weights(
    student_ppl: Sequence[float] | np.ndarray,
    teacher_ppl: Sequence[float] | np.ndarray,
    alpha: float,
    domains: Sequence[str] | None = None,
) -> np.ndarray:
    """Eq. 1 with Eq. 2's floor (``distill.init_floor``, not in the paper):
    ``r0 = α · softmax(ℓ_S/ℓ_T) + (1 - α)/N``, so no domain starts with (almost) no rows."""
    alpha = _check_alpha(alpha)
    r0 = initial_weights(student_ppl, teacher_ppl, domains)
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
) -> np.ndarray:
    """Eq. 2 (factor smooth updating), in log space.

    ``log ψ = log r + ℓ_S/ℓ_T``; ``r' = α ψ/Σψ + (1 - α)/N``. ``weights`` must be
    finite, ``>= 0`` and not all zero (its scale does not matter: ψ is normalised).
    A zero weight stays at the floor ``(1 - α)/N`` instead of producing NaN. Every
    returned weight is ``>= (1 - α)/N`` and the weights sum to 1 (to rounding).
    """
    alpha = _check_alpha(alpha)
    ratio = perplexity_ratio(student_ppl, teacher_ppl, domains)
    r = _check_weights(weights, ratio.size)
    with np.errstate(divide="ignore"):
        log_psi = np.log(r) + ratio
    return alpha * _softmax_log(log_psi) + (1.0 - alpha) / ratio.size


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
        raise ValueError(
            f"fixed mixture must be 'natural', 'uniform' or a {{domain: weight}} dict, got {spec!r}"
        )

    if not isinstance(spec, Mapping):
        raise ValueError(
            f"fixed mixture must be 'natural', 'uniform' or a {{domain: weight}} dict, "
            f"got {type(spec).__name__}"
        )
    index = {d: i for i, d in enumerate(domains)}
    w = np.zeros(n, dtype=np.float64)
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
    init_floor: bool = False,
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
    methods (see the module docstring). ``init_floor``: ``ddk``'s interval 0 uses
    :func:`floored_initial_weights` instead of plain Eq. 1.
    """
    if interval < 0:
        raise ValueError(f"interval must be >= 0, got {interval}")
    rule = method_spec(method).weights

    if rule == "eq1_then_eq2":
        if interval == 0:
            if init_floor:
                return floored_initial_weights(student_ppl, teacher_ppl, alpha, domains)
            return initial_weights(student_ppl, teacher_ppl, domains)
        if weights is None:
            raise ValueError(f"method {method!r} needs the previous interval's weights after 0")
        return smooth_update(weights, student_ppl, teacher_ppl, alpha, domains)
    if rule == "eq1_every_interval":
        return initial_weights(student_ppl, teacher_ppl, domains)

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
