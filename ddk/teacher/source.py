"""Which teacher a run gets: the one place that turns the config into a `TeacherSource`.

    teacher.mode offline   a `ddk cache-teacher` cache; no teacher model is loaded
    served                 a teacher server's prompt_logprobs (`ddk.teacher.served`)
    online                 the teacher model, placed as `teacher.placement` asks, when the
                           method trains with its signal; else (cpt) loaded only for its
                           perplexities, on first use, and freed after
    no model.teacher       None: the method needs none (cpt without a teacher)

    model.teachers         a teacher per domain (`PerDomainTeachers`), each as above (with
                           teacher.tokenizer cross: online only, each a cross-tokenizer one)

A new kind of teacher (served, ...) is another `TeacherSource` chosen here.
"""

from __future__ import annotations

from ddk.errors import DDKError
from ddk.methods import method_spec
from ddk.models import check_vocab, embedding_rows
from ddk.teacher.cache_format import cache_identity
from ddk.teacher.crosstok import CrossTokenizerTeacher, load_cross_teacher
from ddk.teacher.offline import OfflineTeacher
from ddk.teacher.online import OnlineTeacher
from ddk.teacher.per_domain import PerDomainTeachers, teacher_groups
from ddk.teacher.perplexity import SharedPerplexities
from ddk.teacher.placement import load_configured_teacher
from ddk.teacher.retokenize import CROSS_TEACHERS_ONLINE
from ddk.teacher.served import ServedTeacher
from ddk.teacher.signals import TeacherSource


def teacher_source(
    cfg, data, runtime, *, student_rows: int, splits, plan=None, step=None
) -> TeacherSource | None:
    """The run's teacher. `splits`: the held-out splits whose perplexities the run will ask
    for (computed together: a teacher loaded only for them loads once). With `model.teachers`
    naming 2+ teachers: a `PerDomainTeachers` over one per teacher. `plan`, `step` (the run's
    IntervalPlan, its current step) let a served teacher ask for micro-batches ahead."""
    method = method_spec(cfg.distill.method)
    groups = teacher_groups(cfg.model.domain_teachers(data.names)) if cfg.model.teacher else {}
    if cfg.teacher.tokenizer == "cross" and len(groups) > 1 and cfg.teacher.mode != "online":
        raise DDKError(CROSS_TEACHERS_ONLINE)
    if cfg.teacher.mode == "served" and method.teacher_for_training:
        return _served(cfg, data, runtime, groups, student_rows, plan, step)

    def shared(model=None, name=None, domains=None) -> SharedPerplexities:
        return SharedPerplexities(
            cfg,
            data,
            runtime,
            model=model,
            student_rows=student_rows,
            splits=splits,
            teacher=name,
            domains=domains,
        )

    def per_domain(load: bool) -> PerDomainTeachers:
        teachers = {}
        for name, domains in groups.items():
            model = load_configured_teacher(cfg, runtime, name) if load else None
            check_vocab(data.vocab_size, embedding_rows(model) if load else None, student_rows)
            teachers[name] = OnlineTeacher(model, runtime.autocast, shared(model, name, domains))
        return PerDomainTeachers(teachers, cfg.model.domain_teachers(data.names))

    if cfg.teacher.mode == "offline" and method.teacher_for_training:
        # No teacher model: the signal and the perplexities come from the cache (a cache
        # without perplexities falls back to computing them, when model.teacher is set).
        check_vocab(data.vocab_size, None, student_rows)
        fallback = None  # a cross-tokenizer cache holds its perplexities (preflight checks)
        if len(groups) > 1:
            fallback = lambda: per_domain(load=False)  # noqa: E731
        elif cfg.model.teacher and cfg.teacher.tokenizer != "cross":
            fallback = shared
        return OfflineTeacher(
            cfg.teacher.cache,
            data.names,
            runtime.device,
            cfg.teacher.sparse_estimator,
            fallback=fallback,
        )
    if cfg.teacher.tokenizer == "cross" and cfg.model.teacher:
        return _cross_teacher(cfg, data, runtime, student_rows, groups)
    trains = bool(cfg.model.teacher) and method.trains_with_teacher(cfg.distill)
    if len(groups) > 1:
        return per_domain(load=trains)
    model = load_configured_teacher(cfg, runtime) if trains else None
    check_vocab(data.vocab_size, embedding_rows(model) if model is not None else None, student_rows)
    if not cfg.model.teacher:
        return None
    return OnlineTeacher(model, runtime.autocast, shared(model))


def _served(cfg, data, runtime, groups, student_rows, plan, step) -> ServedTeacher:
    if len(groups) > 1:
        raise DDKError(
            "teacher.mode: served reads one teacher server; per-domain teachers "
            "(model.teachers) run online or from an offline cache"
        )
    if data.masked:  # packed conversations need per-conversation position ids
        raise DDKError(
            "teacher.mode: served sends token ids only, not the per-conversation position ids "
            "of packed chat data; use teacher.mode: online or offline"
        )
    check_vocab(data.vocab_size, None, student_rows)
    return ServedTeacher(cfg, data, runtime, plan=plan, step=step)


def _cross_teacher(
    cfg, data, runtime, student_rows: int, groups
) -> CrossTokenizerTeacher | PerDomainTeachers:
    """A live teacher with its own tokenizer (also for cpt's perplexities: they need it); with
    `model.teachers` naming 2+ teachers, one per teacher, each scoring its own domains."""
    check_vocab(data.vocab_size, None, student_rows)
    if len(groups) < 2:
        return load_cross_teacher(cfg, data, runtime)
    teachers = {
        name: load_cross_teacher(cfg, data, runtime, name, domains)
        for name, domains in groups.items()
    }
    return PerDomainTeachers(teachers, cfg.model.domain_teachers(data.names))


def pinned_cache(cfg) -> str | None:
    """The identity of the teacher cache a run trains on (None: it reads no cache), which its
    checkpoints record and `--resume` requires unchanged."""
    if cfg.teacher.mode == "offline" and method_spec(cfg.distill.method).teacher_for_training:
        return cache_identity(cfg.teacher.cache)
    return None
