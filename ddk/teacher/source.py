"""Which teacher a run gets: the one place that turns the config into a `TeacherSource`.

    teacher.mode offline   a `ddk cache-teacher` cache; no teacher model is loaded
    online                 the teacher model, placed as `teacher.placement` asks, when the
                           method trains with its signal; else (cpt) loaded only for its
                           perplexities, on first use, and freed after
    no model.teacher       None: the method needs none (cpt without a teacher)

A new kind of teacher (served, per domain, ...) is another `TeacherSource` chosen here.
"""

from __future__ import annotations

from ddk.methods import method_spec
from ddk.models import check_vocab, embedding_rows, load_tokenizer
from ddk.teacher.cache_format import cache_identity
from ddk.teacher.crosstok import CrossTokenizerTeacher
from ddk.teacher.offline import OfflineTeacher
from ddk.teacher.online import OnlineTeacher
from ddk.teacher.perplexity import SharedPerplexities
from ddk.teacher.placement import load_configured_teacher
from ddk.teacher.signals import TeacherSource


def teacher_source(cfg, data, runtime, *, student_rows: int, splits) -> TeacherSource | None:
    """The run's teacher. `splits`: the held-out splits whose perplexities the run will ask
    for (computed together, so a teacher loaded only for them is loaded once)."""
    method = method_spec(cfg.distill.method)

    def shared(model=None) -> SharedPerplexities:
        return SharedPerplexities(
            cfg, data, runtime, model=model, student_rows=student_rows, splits=splits
        )

    if cfg.teacher.mode == "offline" and method.teacher_for_training:
        # No teacher model: the signal and the perplexities come from the cache (a cache
        # without perplexities falls back to computing them, when model.teacher is set).
        check_vocab(data.vocab_size, None, student_rows)
        fallback = shared if cfg.model.teacher else None
        return OfflineTeacher(
            cfg.teacher.cache,
            data.names,
            runtime.device,
            cfg.teacher.sparse_estimator,
            fallback=fallback,
        )
    if cfg.teacher.tokenizer == "cross" and cfg.model.teacher:
        return _cross_teacher(cfg, data, runtime, student_rows)
    model = None
    if cfg.model.teacher and method.trains_with_teacher(cfg.distill):
        model = load_configured_teacher(cfg, runtime)
    check_vocab(data.vocab_size, embedding_rows(model) if model is not None else None, student_rows)
    if not cfg.model.teacher:
        return None
    return OnlineTeacher(model, runtime.autocast, shared(model))


def _cross_teacher(cfg, data, runtime, student_rows: int) -> CrossTokenizerTeacher:
    """A live teacher with its own tokenizer (also for cpt's perplexities: they need it)."""
    check_vocab(data.vocab_size, None, student_rows)
    model = load_configured_teacher(cfg, runtime)
    tokenizer = load_tokenizer(cfg.model.teacher, cfg.model.trust_remote_code)
    check_vocab(len(tokenizer), embedding_rows(model), embedding_rows(model))
    student_tokenizer = load_tokenizer(cfg.model.student, cfg.model.trust_remote_code)
    return CrossTokenizerTeacher(
        model, tokenizer, student_tokenizer, data, autocast=runtime.autocast,
        chunk=cfg.distill.loss_chunk_tokens,
    )  # fmt: skip


def pinned_cache(cfg) -> str | None:
    """The identity of the teacher cache a run trains on (None: it reads no cache), which its
    checkpoints record and `--resume` requires unchanged."""
    if cfg.teacher.mode == "offline" and method_spec(cfg.distill.method).teacher_for_training:
        return cache_identity(cfg.teacher.cache)
    return None
