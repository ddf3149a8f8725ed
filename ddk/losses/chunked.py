"""DDK's loss (Eq. 3) without materialising the full [tokens, vocab] logits.

    total = Σ_tokens CE(z_S, y) + γ · Σ_tokens D(softmax(z_T / τ), softmax(z_S / τ))

over the non-ignored target tokens, with z = hidden @ W.T (+ b) trimmed to the
first ``vocab_size`` columns, then the model's own scalar logit transform if it has
one (Granite's scale, Gemma's softcap: ``ddk.logits``; None for plain models, which
then take exactly the old path). The result is a SUM: the caller divides by the
global token count of the optimizer step (across gradient accumulation and ranks).

In the spirit of Liger-Kernel's ``fused_linear_distillation``, three layers:

- ``_FusedDistillFunction``: a ``torch.autograd.Function`` whose forward walks the
  tokens chunk by chunk, computes the chunk's logits on detached leaves, gets the
  gradients of the chunk's loss w.r.t. the hidden states, W and b with
  ``torch.autograd.grad`` (so any divergence works without a hand-written
  gradient), accumulates them and returns the sums; backward only scales the
  stored gradients by ``grad_output``. Peak memory is independent of the token
  count: about 7 (forward/skew KL) to 10 (JS) [chunk_tokens, vocab] float32
  tensors, plus a float32 gradient buffer of W and one chunk's W gradient.
- ``fused_distill_loss``: the functional entry point.
- ``FusedDistillLoss``: an ``nn.Module`` holding the settings.

Numerics: the LM-head matmul runs in the input dtype (for bf16 models: a bf16
GEMM with float32 accumulation, exactly what the model's own ``lm_head`` does),
and the logits are upcast to float32 at once; softmax, CE and the divergence run
in float32 (float64 inputs stay float64). Gradients come back in the input
dtypes; the W/b gradient is accumulated over chunks in float32.

The teacher is ONE argument: a ``DenseSignal`` (hidden states + LM head: teacher logits are
built chunk by chunk like the student's), a ``SparseSignal`` (a cache: the top-k head plus
either a tail bucket or importance-weighted tail samples, see ``ddk.losses.sparse``) or
a ``CrossSignal`` (a live teacher with another tokenizer, ``ddk.losses.crosstok``), a
``SparseCrossSignal`` (its offline cache, ``ddk.losses.crosstok_sparse``), a ``CompositeSignal``
(a teacher per domain: several of these, each over its own rows; each part goes through its
own path on its rows' student states and the sums add up) or ``None`` (CE only).

``naive_distill_loss`` is the plain reference with the same signature (full
logits, ordinary autograd), and ``chunked_ce_sum`` the evaluation helper
(per-domain perplexity = exp(sum / tokens)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddk.losses import crosstok, crosstok_merge, crosstok_sparse, sparse
from ddk.losses.divergences import NO_DIVERGENCE, DivergenceFn, get_divergence
from ddk.methods import divergence_active, method_spec
from ddk.teacher.signals import (
    CompositeSignal,
    CrossSignal,
    DenseSignal,
    SparseCrossSignal,
    SparseSignal,
    TeacherSignal,
)

if TYPE_CHECKING:
    from ddk.config import DistillSection
    from ddk.logits import LogitTransform

IGNORE_INDEX = -100


class LossSums(NamedTuple):
    """Sums over the non-ignored target tokens of one call (not means)."""

    total: Tensor
    """Σ CE + γ Σ divergence: a differentiable 0-dim float32 tensor."""
    ce: Tensor
    """Σ CE, detached."""
    div: Tensor
    """Σ divergence (unweighted), detached; 0 when the teacher is skipped."""
    tokens: int
    """Number of non-ignored target tokens."""


@dataclass(frozen=True)
class _Settings:
    vocab_size: int
    gamma: float
    tau: float
    divergence_fn: DivergenceFn | None  # None: no teacher, CE only
    skew_lambda: float
    chunk_tokens: int
    # Scalar scale / softcap of models whose logits are not hidden @ W.T + b (ddk.logits).
    student_transform: LogitTransform | None = None
    divergence: str = NO_DIVERGENCE  # the name: a sparse teacher's estimator looks it up
    cross_mismatch: str = "uld"  # a cross-tokenizer teacher's rows without an exact match
    # (The teacher's transform travels in its DenseSignal; a sparse signal already has it.)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, transform: LogitTransform | None = None
) -> Tensor:
    """hidden @ weight.T (+ bias) in the input dtype, returned in (at least) float32, then the
    model's own logit transform (if any) in that precision."""
    z = F.linear(hidden, weight, bias).to(_compute_dtype(hidden.dtype))
    return z if transform is None else transform(z)


def _divergence(logits: Tensor, teacher: TeacherSignal, s: _Settings) -> Tensor:
    """Per-row divergence of one chunk; ``teacher`` holds the chunk's rows (trimmed head)."""
    if isinstance(teacher, SparseSignal):
        return sparse.sparse_divergence(logits, teacher, s.tau, s.divergence, s.skew_lambda)
    if isinstance(teacher, SparseCrossSignal):
        return _sparse_cross(logits, teacher, s.divergence_fn, s.tau, s.skew_lambda,
                             s.cross_mismatch)  # fmt: skip
    with torch.no_grad():
        teacher_logits = _teacher_logits(teacher)
    if isinstance(teacher, CrossSignal):
        return crosstok.cross_divergence(
            logits, teacher_logits, teacher, s.divergence_fn, s.tau, s.skew_lambda,
            s.cross_mismatch,
        )  # fmt: skip
    return s.divergence_fn(logits, teacher_logits, s.tau, s.skew_lambda)


def _sparse_cross(logits, teacher: SparseCrossSignal, fn, tau, skew_lambda, mismatch) -> Tensor:
    rows = crosstok_sparse.SparseCrossRows(*teacher.row_fields)
    return crosstok_sparse.sparse_cross_divergence(
        logits, rows, teacher.student_shared, teacher.shared_index, fn, tau, skew_lambda, mismatch
    )


def _teacher_logits(teacher: DenseSignal | CrossSignal) -> Tensor:
    z = _logits(teacher.hidden, teacher.head_weight, teacher.head_bias, teacher.transform)
    return z[:, : teacher.teacher_vocab] if isinstance(teacher, CrossSignal) else z


def _with_transform(teacher: TeacherSignal | None, transform) -> TeacherSignal | None:
    """Fold a ``teacher_transform`` argument into the dense signal that it belongs to."""
    if transform is None or teacher is None:
        return teacher
    if isinstance(teacher, SparseSignal | SparseCrossSignal | CompositeSignal):
        raise ValueError("teacher_transform applies to a dense teacher; a sparse signal has it")
    return teacher._replace(transform=transform)


def _chunk_sums(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: TeacherSignal | None,
    labels: Tensor,
    s: _Settings,
) -> tuple[Tensor, Tensor | None]:
    """CE sum and divergence sum of one chunk of valid (non-ignored) rows."""
    logits = _logits(hidden, weight, bias, s.student_transform)
    ce = F.cross_entropy(logits, labels, reduction="sum")
    if s.divergence_fn is None:
        return ce, None
    return ce, _divergence(logits, teacher, s).sum()


def _trim_teacher(teacher: TeacherSignal | None, V: int) -> TeacherSignal | None:
    if not isinstance(teacher, DenseSignal):
        return teacher
    bias = None if teacher.head_bias is None else teacher.head_bias[:V].detach()
    return teacher._replace(head_weight=teacher.head_weight[:V].detach(), head_bias=bias)


def _teacher_rows(teacher: TeacherSignal | None, idx: Tensor) -> TeacherSignal | None:
    if teacher is None:
        return None
    if isinstance(teacher, SparseSignal):
        return sparse.slice_rows(teacher, idx)
    if isinstance(teacher, SparseCrossSignal):
        rows = (t.index_select(0, idx) for t in teacher.row_fields)
        return SparseCrossSignal(*rows, teacher.student_shared, teacher.shared_index)
    if isinstance(teacher, CrossSignal):
        return crosstok.slice_rows(teacher, idx)
    return teacher._replace(hidden=teacher.hidden.index_select(0, idx).detach())


def _run_chunks(
    student_hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: TeacherSignal | None,
    rows: Tensor,
    labels: Tensor,
    s: _Settings,
    want: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """Loop over chunks of ``rows``; return (ce_sum, div_sum, [grad_hidden, grad_W, grad_b]).

    ``want`` says which of (student_hidden, weight, bias) get a gradient; the
    gradients are of ``ce + gamma * div`` and come back in the inputs' dtypes.
    """
    V = s.vocab_size
    device = student_hidden.device
    acc_dtype = _compute_dtype(weight.dtype)
    # Trimming W (not the logits) skips the padded rows' matmul; their gradient is 0.
    w = weight[:V].detach().requires_grad_(want[1])
    b = None if bias is None else bias[:V].detach().requires_grad_(want[2])
    teacher = _trim_teacher(teacher, V)

    grad_h = torch.zeros_like(student_hidden) if want[0] else None
    grad_w_full = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if want[1] else None
    grad_b_full = torch.zeros(bias.shape, dtype=acc_dtype, device=device) if want[2] else None

    ce_sum = torch.zeros((), dtype=_compute_dtype(student_hidden.dtype), device=device)
    div_sum = torch.zeros_like(ce_sum)
    for start in range(0, rows.numel(), s.chunk_tokens):
        idx = rows[start : start + s.chunk_tokens]
        h = student_hidden.index_select(0, idx).detach().requires_grad_(want[0])
        t = None if s.divergence_fn is None else _teacher_rows(teacher, idx)
        with torch.set_grad_enabled(any(want)):
            ce, div = _chunk_sums(h, w, b, t, labels.index_select(0, idx), s)
            total = ce if div is None else ce + s.gamma * div
        if any(want):
            leaves = [leaf for leaf, flag in zip((h, w, b), want) if flag]
            grads = iter(torch.autograd.grad(total, leaves))
            if want[0]:
                grad_h.index_copy_(0, idx, next(grads).to(grad_h.dtype))
            if want[1]:
                grad_w_full[:V] += next(grads)
            if want[2]:
                grad_b_full[:V] += next(grads)
            del grads  # frees this chunk's [V, H] gradient before the next chunk
        ce_sum += ce.detach()
        if div is not None:
            div_sum += div.detach()

    grad_w = None if grad_w_full is None else grad_w_full.to(weight.dtype)
    grad_b = None if grad_b_full is None else grad_b_full.to(bias.dtype)
    return ce_sum, div_sum, [grad_h, grad_w, grad_b]


class _FusedDistillFunction(torch.autograd.Function):
    """Inputs: (student_hidden, W, b, teacher signal, rows, labels, settings).

    Outputs: (total, ce_sum, div_sum); only ``total`` is differentiable, and only
    w.r.t. the first three inputs. The gradients are computed in forward.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        weight,
        bias,
        teacher,
        rows,
        labels,
        settings,
    ):
        want = tuple(ctx.needs_input_grad[:3])
        ce, div, grads = _run_chunks(
            student_hidden, weight, bias, teacher, rows, labels, settings, want
        )
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(ce, div)
        return ce + settings.gamma * div, ce, div

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_div):
        grads = [None if g is None else g * grad_total for g in ctx.saved_tensors]
        return (*grads, *[None] * (len(ctx.needs_input_grad) - len(grads)))


def _validate(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    labels: Tensor,
    teacher: TeacherSignal | None,
    vocab_size: int,
    tau: float,
    skew_lambda: float,
    chunk_tokens: int,
) -> None:
    if student_hidden.dim() != 2 or labels.shape != student_hidden.shape[:1]:
        raise ValueError(
            f"expected student_hidden [N, H] and labels [N], got {tuple(student_hidden.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if not 0 < vocab_size <= student_head_weight.shape[0]:
        raise ValueError(
            f"vocab_size {vocab_size} must be in 1..{student_head_weight.shape[0]} (student head rows)"
        )
    if isinstance(teacher, DenseSignal):
        if teacher.head_weight is None:
            raise ValueError("the dense teacher signal has no head_weight")
        if teacher.hidden.shape[0] != student_hidden.shape[0]:
            raise ValueError("teacher hidden and student_hidden must have the same number of rows")
        if teacher.head_weight.shape[0] < vocab_size:
            raise ValueError(
                f"teacher head has {teacher.head_weight.shape[0]} rows < vocab_size {vocab_size}"
            )
    elif isinstance(teacher, SparseSignal):
        n, k = teacher.ids.shape
        if n != student_hidden.shape[0] or teacher.logp.shape != (n, k):
            raise ValueError(
                "sparse teacher ids/logp must be [N, k] with N = student_hidden rows, got "
                f"{tuple(teacher.ids.shape)} and {tuple(teacher.logp.shape)}"
            )
        if teacher.log_tail.shape != (n,) or k > vocab_size:
            raise ValueError(
                f"sparse teacher: log_tail must be [N] and k <= vocab_size {vocab_size}"
            )
        given = [t for t in teacher[3:] if t is not None]  # the sample_* fields
        if given and (len(given) != 3 or any(t.shape != (n, given[0].shape[-1]) for t in given)):
            raise ValueError("sparse teacher: sample_ids, sample_logp, sample_logw must be [N, m]")
    elif isinstance(teacher, CompositeSignal):
        _validate_parts(teacher, student_hidden, student_head_weight, vocab_size)
    elif teacher is not None:
        _validate_cross(teacher, student_hidden.shape[0])
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0.0 <= skew_lambda <= 1.0:
        raise ValueError(f"skew_lambda must be in [0, 1], got {skew_lambda}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


def _validate_cross(teacher, n: int) -> None:
    """`_validate` of a cross-tokenizer teacher's rows (live or cached) against N rows."""
    if isinstance(teacher, CrossSignal):
        if teacher.hidden.shape[0] != n or teacher.mode.shape != (n,):
            raise ValueError("cross-tokenizer teacher hidden and mode must have N rows")
        if teacher.student_shared.shape != teacher.teacher_shared.shape:
            raise ValueError("cross-tokenizer teacher: shared id lists differ in length")
    elif isinstance(teacher, SparseCrossSignal):
        k = teacher.ids.shape[1]
        if any(t.shape[0] != n for t in teacher.row_fields) or teacher.logp.shape != (n, k):
            raise ValueError("sparse cross-tokenizer teacher rows must be [N] or [N, k]")
    else:
        raise ValueError(
            "teacher must be a DenseSignal, a SparseSignal, a CrossSignal, a SparseCrossSignal "
            f"or None, got {type(teacher)}"
        )


def _validate_parts(teacher: CompositeSignal, student_hidden: Tensor, head: Tensor,
                    vocab_size: int) -> None:  # fmt: skip
    """Each part's signal against its rows (shapes only: meta tensors), and every row of the
    micro-batch in exactly one part."""
    rows = [r.reshape(-1).cpu() for r, _ in teacher.parts]
    n = student_hidden.shape[0]
    covered = torch.cat(rows).sort().values if rows else torch.zeros(0, dtype=torch.long)
    if not torch.equal(covered, torch.arange(n)):
        raise ValueError("a composite teacher signal's parts must cover every row exactly once")
    for r, signal in teacher.parts:
        if isinstance(signal, CompositeSignal) or signal is None:
            raise ValueError("a composite teacher signal's parts are signals of one teacher each")
        shape = (r.numel(), student_hidden.shape[1])
        meta = torch.empty(shape, device="meta")
        _validate(meta, head, torch.empty(r.numel(), device="meta"), signal, vocab_size,
                  1.0, 0.0, 1)  # fmt: skip


def _composite_sums(student_hidden: Tensor, head_weight: Tensor, labels: Tensor,
                    teacher: CompositeSignal, **kw) -> LossSums:  # fmt: skip
    """`fused_distill_loss` of each part on its rows, summed: each row against its own teacher,
    the normalisation (by the micro-batch's targets) left to the caller as for one teacher."""
    parts = []
    for rows, signal in teacher.parts:
        rows = rows.reshape(-1).to(student_hidden.device)
        parts.append(fused_distill_loss(student_hidden.index_select(0, rows), head_weight,
                                        labels.index_select(0, rows), signal, **kw))  # fmt: skip
    ce, div = (torch.stack([getattr(p, f) for p in parts]).sum() for f in ("ce", "div"))
    total = torch.stack([p.total for p in parts]).sum()
    return LossSums(total, ce, div, sum(p.tokens for p in parts))


def _uses_teacher(divergence: str, gamma: float, teacher: TeacherSignal | None) -> bool:
    return teacher is not None and divergence_active(divergence, gamma)


def fused_distill_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    labels: Tensor,
    teacher: TeacherSignal | None,
    *,
    vocab_size: int,
    gamma: float,
    tau: float,
    divergence: str,
    skew_lambda: float = 0.1,
    chunk_tokens: int = 1024,
    student_head_bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    student_transform: LogitTransform | None = None,
    teacher_transform: LogitTransform | None = None,
    cross_mismatch: str = "uld",
) -> LossSums:
    """Σ CE + γ Σ divergence over non-ignored tokens, chunk by chunk (see the module doc).

    ``student_hidden`` [N, H] are the final hidden states already aligned with
    ``labels`` [N] (shifted, flattened); ``student_head_weight`` [V_s, H] is the LM
    head (V_s >= vocab_size; extra rows are padding and get a zero gradient).
    ``teacher``: any ``TeacherSignal`` (rows aligned with ``labels``; a ``CompositeSignal``:
    each part's rows against its own signal) or ``None``. The teacher is skipped entirely (no matmul) when ``divergence == "none"``,
    ``gamma == 0`` or ``teacher is None``. No gradient reaches the teacher.
    """
    div_fn = get_divergence(divergence)  # validates the name even when unused
    teacher = _with_transform(teacher, teacher_transform)
    _validate(
        student_hidden, student_head_weight, labels, teacher, vocab_size, tau, skew_lambda,
        chunk_tokens,
    )  # fmt: skip
    if isinstance(teacher, CompositeSignal):
        return _composite_sums(
            student_hidden, student_head_weight, labels, teacher, vocab_size=vocab_size,
            gamma=gamma, tau=tau, divergence=divergence, skew_lambda=skew_lambda,
            chunk_tokens=chunk_tokens, student_head_bias=student_head_bias,
            ignore_index=ignore_index, student_transform=student_transform,
            cross_mismatch=cross_mismatch,
        )  # fmt: skip
    if not _uses_teacher(divergence, gamma, teacher):
        div_fn = teacher = None
    head = (student_head_weight, student_head_bias, student_transform, vocab_size)
    teacher = crosstok_merge.prepare_signal(teacher, cross_mismatch, student_hidden, head, labels,
                                            float(tau), chunk_tokens, ignore_index)  # fmt: skip
    settings = _Settings(vocab_size, float(gamma), float(tau), div_fn, float(skew_lambda),
                         chunk_tokens, student_transform, divergence, cross_mismatch)  # fmt: skip
    rows = (labels != ignore_index).nonzero().squeeze(1)  # the one host sync of a call
    args = (student_hidden, student_head_weight, student_head_bias, teacher, rows, labels)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in args[:3]
    )
    if needs_grad:
        total, ce, div = _FusedDistillFunction.apply(*args, settings)
    else:
        ce, div, _ = _run_chunks(*args, settings, (False, False, False))
        total = ce + settings.gamma * div
    return LossSums(total, ce, div, int(rows.numel()))


def naive_distill_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    labels: Tensor,
    teacher: TeacherSignal | None,
    *,
    vocab_size: int,
    gamma: float,
    tau: float,
    divergence: str,
    skew_lambda: float = 0.1,
    chunk_tokens: int = 1024,
    student_head_bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    student_transform: LogitTransform | None = None,
    teacher_transform: LogitTransform | None = None,
    cross_mismatch: str = "uld",
) -> LossSums:
    """Reference for ``fused_distill_loss``: full [N, V] logits, ordinary autograd.

    Same signature and result; ``chunk_tokens`` is accepted and ignored. Used by
    the tests and the memory benchmark.
    """
    del chunk_tokens
    div_fn = get_divergence(divergence)
    teacher = _with_transform(teacher, teacher_transform)
    _validate(student_hidden, student_head_weight, labels, teacher, vocab_size, tau, skew_lambda, 1)
    logits = _logits(student_hidden, student_head_weight, student_head_bias)[:, :vocab_size]
    if student_transform is not None:
        logits = student_transform(logits)
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    mask = labels != ignore_index
    tokens = int(mask.sum())
    if not _uses_teacher(divergence, gamma, teacher):
        div = torch.zeros_like(ce)
        total = ce
    else:
        settings = (vocab_size, divergence, div_fn, float(tau), float(skew_lambda), cross_mismatch,
                    ignore_index)  # fmt: skip
        if isinstance(teacher, CompositeSignal):  # each part's rows against its own teacher
            per_token = logits.new_zeros(logits.shape[0])
            for rows, part in teacher.parts:
                rows = rows.reshape(-1).to(logits.device)
                got = _naive_per_token(logits[rows], labels[rows], part, *settings)
                per_token = per_token.index_put((rows,), got.to(per_token.dtype))
        else:
            per_token = _naive_per_token(logits, labels, teacher, *settings)
        div = torch.where(mask, per_token, 0.0).sum()
        total = ce + gamma * div
    return LossSums(total, ce.detach(), div.detach(), tokens)


def _naive_per_token(logits: Tensor, labels: Tensor, teacher: TeacherSignal, vocab_size: int,
                     divergence: str, div_fn, tau: float, skew_lambda: float,
                     cross_mismatch: str, ignore_index: int) -> Tensor:  # fmt: skip
    """`naive_distill_loss`'s per-token divergence against one teacher's signal."""
    if isinstance(teacher, SparseSignal):
        return sparse.sparse_divergence(logits, teacher, tau, divergence, skew_lambda)
    if isinstance(teacher, SparseCrossSignal):
        return _sparse_cross(logits, teacher, div_fn, tau, skew_lambda, cross_mismatch)
    with torch.no_grad():
        teacher_logits = _teacher_logits(_trim_teacher(teacher, vocab_size))
    if isinstance(teacher, CrossSignal):
        return crosstok.full_cross_divergence(
            logits, teacher_logits, teacher, labels, div_fn, tau, skew_lambda, cross_mismatch,
            ignore_index,
        )  # fmt: skip
    return div_fn(logits, teacher_logits, tau, skew_lambda)


@torch.no_grad()
def chunked_ce_sum(
    hidden: Tensor,
    head_weight: Tensor,
    labels: Tensor,
    *,
    vocab_size: int,
    chunk_tokens: int = 1024,
    head_bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    transform: LogitTransform | None = None,
) -> tuple[Tensor, int]:
    """(Σ CE over non-ignored tokens as a 0-dim float32 tensor, token count), no graph.

    For evaluation: per-domain perplexity = exp(Σ sums / Σ tokens) over batches.
    """
    _validate(hidden, head_weight, labels, None, vocab_size, 1.0, 0.0, chunk_tokens)
    settings = _Settings(vocab_size, 0.0, 1.0, None, 0.0, chunk_tokens, transform)
    rows = (labels != ignore_index).nonzero().squeeze(1)
    ce, _, _ = _run_chunks(
        hidden, head_weight, head_bias, None, rows, labels, settings, (False,) * 3
    )
    return ce, int(rows.numel())


class FusedDistillLoss(nn.Module):
    """``fused_distill_loss`` with its settings held; ``forward`` returns ``LossSums``."""

    def __init__(
        self,
        vocab_size: int,
        *,
        gamma: float = 0.2,
        tau: float = 1.0,
        divergence: str = "forward_kl",
        skew_lambda: float = 0.1,
        chunk_tokens: int = 1024,
        ignore_index: int = IGNORE_INDEX,
        cross_mismatch: str = "uld",
    ) -> None:
        super().__init__()
        if cross_mismatch not in crosstok.MISMATCH_LOSSES:
            raise ValueError(f"cross_mismatch must be one of {crosstok.MISMATCH_LOSSES}")
        self.cross_mismatch = cross_mismatch
        get_divergence(divergence)  # fail at construction on an unknown name
        self.vocab_size = vocab_size
        self.gamma = gamma
        self.tau = tau
        self.divergence = divergence
        self.skew_lambda = skew_lambda
        self.chunk_tokens = chunk_tokens
        self.ignore_index = ignore_index

    def forward(
        self,
        student_hidden: Tensor,
        student_head_weight: Tensor,
        labels: Tensor,
        teacher: TeacherSignal | None = None,
        student_head_bias: Tensor | None = None,
        *,
        student_transform: LogitTransform | None = None,
        teacher_transform: LogitTransform | None = None,
    ) -> LossSums:
        return fused_distill_loss(
            student_hidden,
            student_head_weight,
            labels,
            teacher,
            vocab_size=self.vocab_size,
            gamma=self.gamma,
            tau=self.tau,
            divergence=self.divergence,
            skew_lambda=self.skew_lambda,
            chunk_tokens=self.chunk_tokens,
            student_head_bias=student_head_bias,
            ignore_index=self.ignore_index,
            student_transform=student_transform,
            teacher_transform=teacher_transform,
            cross_mismatch=self.cross_mismatch,
        )

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, gamma={self.gamma}, tau={self.tau}, "
            f"divergence={self.divergence!r}, skew_lambda={self.skew_lambda}, "
            f"chunk_tokens={self.chunk_tokens}"
        )


def loss_from_config(distill: DistillSection, vocab_size: int) -> FusedDistillLoss:
    """The loss of a run, from its ``distill`` section: the method's divergence ("none" for
    CE-only methods), γ (times τ² with ``tau_squared``, Hinton-style KD; the paper's Eq. 3 has
    no τ²), τ, the skew mixing and the chunk size. The one mapping from config to loss."""
    gamma = distill.gamma * distill.tau**2 if distill.tau_squared else distill.gamma
    return FusedDistillLoss(
        vocab_size,
        gamma=gamma,
        tau=distill.tau,
        divergence=method_spec(distill.method).loss_divergence(distill.divergence),
        skew_lambda=distill.skew_lambda,
        chunk_tokens=distill.loss_chunk_tokens,
        cross_mismatch=distill.cross_mismatch,
    )
