"""Per-token divergences between the student's and the teacher's next-token distributions.

Every function has the signature

    fn(student_logits [n, V], teacher_logits [n, V], tau, skew_lambda) -> Tensor [n]

and returns one value per row (token). The temperature is applied to BOTH sides
(``softmax(logits / tau)``); there is no ``tau**2`` factor (DDK Eq. 3 has none).
The math runs in at least float32 (half/bfloat16 inputs are upcast, float64 stays
float64). Everything is built from ``log_softmax`` and log-space mixtures, and a
probability that is exactly 0 (a ``-inf`` logit) contributes 0 to the sum, with a
finite gradient, instead of ``0 * -inf = NaN``.

Each divergence is also a sum over the vocabulary of per-entry terms ``f(p_j, q_j)``;
``DIVERGENCE_TERMS`` holds those terms (same names) for the sparse teacher's sampled
estimator, which evaluates them on a few entries only (``ddk.losses.sparse``).

``DIVERGENCES`` is the one place a divergence name is defined. The config's
``Divergence`` literal is these names plus ``"none"`` (``NO_DIVERGENCE``): no
divergence term at all (continued pre-training); the chunked loss handles it by
skipping the teacher, so it has no entry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

DivergenceFn = Callable[[Tensor, Tensor, float, float], Tensor]
DivergenceTermsFn = Callable[[Tensor, Tensor, float], Tensor]

NO_DIVERGENCE = "none"


def _log_probs(logits: Tensor, tau: float) -> Tensor:
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    return torch.log_softmax(logits if tau == 1 else logits / tau, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities; terms with p == 0 are exactly 0."""
    p = log_p.exp()
    # Zeroing the difference (not only the product) keeps -inf - -inf = NaN out of
    # both the value and the gradient. The in-place ops spare a [n, V] tensor each;
    # autograd keeps what the gradient needs. (Deliberately not a batched matmul:
    # under TF32, a common trainer setting, it would round p and the difference.)
    return (log_p - log_q).masked_fill_(p == 0, 0.0).mul_(p).sum(dim=-1)


class _LogMix(torch.autograd.Function):
    """log(w * exp(a) + (1 - w) * exp(b)) elementwise, for log-probabilities a, b.

    A fused primitive rather than a chain of ops: it keeps one output tensor (no
    temporaries saved for backward) and a NaN-free gradient where both a and b are
    -inf (torch.logaddexp's gradient is NaN there).
    """

    @staticmethod
    def forward(ctx, log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
        # 0 < weight_a < 1 (the wrapper handles the ends).
        out = torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))
        ctx.save_for_backward(log_a, out)
        ctx.weight_a = weight_a
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        log_a, out = ctx.saved_tensors
        # Responsibility of a: w * exp(a - out) in [0, 1]; b's is 1 - that. Both are 0
        # where out == -inf (a and b both zero): no mass, no gradient.
        resp_a = (log_a - out).exp_().mul_(ctx.weight_a).clamp_(0.0, 1.0)
        dead = torch.isneginf(out)
        resp_a.masked_fill_(dead, 0.0)
        grad_a = grad_out * resp_a
        grad_b = (grad_out - grad_a).masked_fill_(dead, 0.0)
        return grad_a, grad_b, None


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b) for log-probabilities; -inf where both are 0."""
    if weight_a == 1.0:
        return log_a
    if weight_a == 0.0:
        return log_b
    return _LogMix.apply(log_a, log_b, float(weight_a))


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0, skew_lambda: float = 0.0
) -> Tensor:
    """KL(p_T || p_S): the teacher-weighted (mean-seeking) direction; DDK's default."""
    del skew_lambda
    return _kl(_log_probs(teacher_logits, tau), _log_probs(student_logits, tau))


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0, skew_lambda: float = 0.0
) -> Tensor:
    """KL(p_S || p_T): the student-weighted (mode-seeking) direction (MiniLLM)."""
    del skew_lambda
    return _kl(_log_probs(student_logits, tau), _log_probs(teacher_logits, tau))


def js(
    student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0, skew_lambda: float = 0.0
) -> Tensor:
    """Jensen-Shannon: 0.5 KL(p_T || m) + 0.5 KL(p_S || m), m = (p_T + p_S) / 2."""
    del skew_lambda
    log_s = _log_probs(student_logits, tau)
    log_t = _log_probs(teacher_logits, tau)
    log_m = _log_mix(log_t, log_s, 0.5)
    return 0.5 * _kl(log_t, log_m) + 0.5 * _kl(log_s, log_m)


def skew_kl(
    student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0, skew_lambda: float = 0.1
) -> Tensor:
    """DistiLLM skew forward KL: KL(p_T || λ p_T + (1 - λ) p_S), λ = skew_lambda."""
    log_s = _log_probs(student_logits, tau)
    log_t = _log_probs(teacher_logits, tau)
    return _kl(log_t, _log_mix(log_t, log_s, skew_lambda))


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0, skew_lambda: float = 0.1
) -> Tensor:
    """DistiLLM skew reverse KL: KL(p_S || λ p_S + (1 - λ) p_T), λ = skew_lambda."""
    log_s = _log_probs(student_logits, tau)
    log_t = _log_probs(teacher_logits, tau)
    return _kl(log_s, _log_mix(log_s, log_t, skew_lambda))


DIVERGENCES: dict[str, DivergenceFn] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "js": js,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
}
"""Name -> per-token divergence. The single source of truth for divergence names."""


def _kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise p (log p - log q); 0 where p == 0 (with a finite gradient)."""
    p = log_p.exp()
    return torch.where(p == 0, 0.0, log_p - log_q) * p


def forward_kl_terms(log_p: Tensor, log_q: Tensor, skew_lambda: float = 0.0) -> Tensor:
    del skew_lambda
    return _kl_terms(log_p, log_q)


def reverse_kl_terms(log_p: Tensor, log_q: Tensor, skew_lambda: float = 0.0) -> Tensor:
    del skew_lambda
    return _kl_terms(log_q, log_p)


def js_terms(log_p: Tensor, log_q: Tensor, skew_lambda: float = 0.0) -> Tensor:
    del skew_lambda
    log_m = _log_mix(log_p, log_q, 0.5)
    return 0.5 * _kl_terms(log_p, log_m) + 0.5 * _kl_terms(log_q, log_m)


def skew_kl_terms(log_p: Tensor, log_q: Tensor, skew_lambda: float = 0.1) -> Tensor:
    return _kl_terms(log_p, _log_mix(log_p, log_q, skew_lambda))


def skew_reverse_kl_terms(log_p: Tensor, log_q: Tensor, skew_lambda: float = 0.1) -> Tensor:
    return _kl_terms(log_q, _log_mix(log_q, log_p, skew_lambda))


DIVERGENCE_TERMS: dict[str, DivergenceTermsFn] = {
    "forward_kl": forward_kl_terms,
    "reverse_kl": reverse_kl_terms,
    "js": js_terms,
    "skew_kl": skew_kl_terms,
    "skew_reverse_kl": skew_reverse_kl_terms,
}
"""Name -> ``terms(log_p_teacher, log_q_student, skew_lambda)``: the per-entry terms ``f(p_j,
q_j)`` (elementwise, any shape) whose sum over the vocabulary is ``DIVERGENCES[name]`` at the
same temperature. The inputs are log-probabilities, used as they are (no softmax), so the terms
can be evaluated on a subset of the vocabulary, or on a bucket's total mass."""
assert DIVERGENCE_TERMS.keys() == DIVERGENCES.keys()


def get_divergence(name: str) -> DivergenceFn | None:
    """The function registered under ``name``; ``None`` for ``"none"``; ValueError otherwise."""
    if name == NO_DIVERGENCE:
        return None
    try:
        return DIVERGENCES[name]
    except KeyError:
        valid = ", ".join([*DIVERGENCES, NO_DIVERGENCE])
        raise ValueError(f"unknown divergence '{name}'; expected one of: {valid}") from None
