"""Where the teacher's signal and perplexities come from.

- signals: what a teacher hands the loss (dense or sparse), and `TeacherSource`
- online: a live teacher model (`OnlineTeacher`)
- offline: a `ddk cache-teacher` cache read back (`OfflineTeacher`)
- cache_format: the cache's on-disk format
- sampling: the cache's tail samples (top-k head plus draws from the teacher's tail)
- placement: where a live teacher lives across processes (replicated, sharded, offloaded)
- perplexity: teacher perplexities, cached per (data, teacher), and RUN/teacher_ppl.json
- source: which `TeacherSource` a run's config asks for

The package itself exports only the signals: the losses import them, and must not pull in the
teacher's models, caches and evaluation.
"""

from ddk.teacher.signals import (
    Batch,
    DenseSignal,
    SparseSignal,
    TeacherSignal,
    TeacherSource,
    sparse_from_logits,
)

__all__ = [
    "Batch",
    "DenseSignal",
    "SparseSignal",
    "TeacherSignal",
    "TeacherSource",
    "sparse_from_logits",
]
