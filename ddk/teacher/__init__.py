"""Where the teacher's signal comes from. Today: a live teacher forward (`OnlineTeacher`)."""

from ddk.teacher.online import OnlineTeacher, TeacherSignal

__all__ = ["OnlineTeacher", "TeacherSignal"]
