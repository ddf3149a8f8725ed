"""Where the teacher's signal comes from: a live teacher forward (`OnlineTeacher`, dense) or a
`ddk cache-teacher` cache (`OfflineTeacher` in `ddk.teacher.cache`, sparse)."""

from ddk.teacher.online import OnlineTeacher
from ddk.teacher.signals import Batch, DenseSignal, SparseSignal, TeacherSignal, TeacherSource

__all__ = [
    "Batch",
    "DenseSignal",
    "OnlineTeacher",
    "SparseSignal",
    "TeacherSignal",
    "TeacherSource",
]
