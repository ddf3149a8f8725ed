"""A teacher per domain (`model.teachers`): each row of a micro-batch gets its signal from its
domain's teacher, and each domain's Eq. 1 ratio is taken against its own teacher.

Each teacher runs forward once per micro-batch, on its own rows only (all of them, batched
together). A micro-batch whose rows all belong to one teacher hands the loss that teacher's
signal unchanged, so mapping every domain to one teacher is exactly today's single-teacher run.
A micro-batch that mixes teachers hands the loss one `DenseSignal` whose logits are each row's
own teacher's (`merge_dense`): the teachers' hidden states side by side in a block-diagonal
layout, against their LM heads concatenated along the hidden axis,

    [h_A, 0, s_A] @ [W_A | W_B | b_A]^T = s_A · (h_A W_A^T + b_A)    (a row of teacher A)

so the fused loss builds each chunk's teacher logits with one matmul as before, and no
[tokens, vocab] tensor exists. The zero blocks cost a matmul over sum(H_t) instead of H_t.

With `teacher.tokenizer: cross` each teacher is a `CrossTokenizerTeacher` (its own tokenizer,
or the student's: then its alignment is the identity). Their signals cannot share one head, so
a mixed micro-batch hands the loss a `CompositeSignal`: each teacher's `CrossSignal` over its
rows' tokens, which the loss takes part by part (`ddk.losses.chunked`). Each domain's Eq. 1
ratio is then against its own teacher's per-byte NLL (`ddk.teacher.crosstok`).
"""

from __future__ import annotations

import numpy as np
import torch

from ddk.errors import DDKError
from ddk.logits import LogitTransform
from ddk.teacher.placement import is_sharded
from ddk.teacher.signals import Batch, CompositeSignal, CrossSignal, DenseSignal


def teacher_groups(domain_teachers: dict[str, str]) -> dict[str, list[str]]:
    """{teacher: [its domains]}, teachers in order of their first domain."""
    groups: dict[str, list[str]] = {}
    for domain, teacher in domain_teachers.items():
        groups.setdefault(teacher, []).append(domain)
    return groups


def _scale_and_cap(transform: LogitTransform | None) -> tuple[float, float | None]:
    return (1.0, None) if transform is None else (transform.scale, transform.softcap)


def merged_head(signals: list[DenseSignal]) -> torch.Tensor:
    """The teachers' LM heads side by side along the hidden axis, each bias as one more
    column, trimmed to the smallest vocabulary: [V, sum(H_t + has_bias_t)]."""
    vocab = min(s.head_weight.shape[0] for s in signals)
    heads = []
    for s in signals:
        heads.append(s.head_weight[:vocab])
        if s.head_bias is not None:
            heads.append(s.head_bias[:vocab, None].to(s.head_weight.dtype))
    return torch.cat(heads, dim=1)


def merge_dense(
    parts: list[tuple[np.ndarray, DenseSignal]], batch: int, seq: int, head=None
) -> DenseSignal:
    """One signal for a micro-batch of `batch` rows of `seq` tokens from `parts`, (row
    indices, that teacher's signal over those rows in their order): row r's logits are its
    own teacher's. A teacher's logit scale is folded into its hidden states and bias; teachers
    whose soft-caps differ cannot share one signal. `head`: `merged_head` of the parts'
    signals, when the caller keeps it (the heads are frozen)."""
    caps = {_scale_and_cap(s.transform)[1] for _, s in parts}
    if len(caps) > 1:
        raise DDKError(
            f"model.teachers: teachers that soft-cap logits differently ({sorted(caps, key=str)}) "
            "cannot share a micro-batch; map these domains to teachers of one family"
        )
    ref = parts[0][1].hidden
    width = sum(s.hidden.shape[1] + (s.head_bias is not None) for _, s in parts)
    hidden = torch.zeros(batch * seq, width, dtype=ref.dtype, device=ref.device)
    col = 0
    for rows, signal in parts:
        scale = _scale_and_cap(signal.transform)[0]
        tokens = torch.from_numpy((rows[:, None] * seq + np.arange(seq)).reshape(-1))
        tokens = tokens.to(ref.device)
        h = signal.hidden.shape[1]
        hidden[tokens, col : col + h] = signal.hidden * scale if scale != 1.0 else signal.hidden
        col += h
        if signal.head_bias is not None:
            hidden[tokens, col] = scale
            col += 1
    head = merged_head([s for _, s in parts]) if head is None else head
    cap = caps.pop()
    return DenseSignal(hidden, head, None, None if cap is None else LogitTransform(1.0, cap))


def composite(parts: list[tuple[np.ndarray, CrossSignal]], seq: int) -> CompositeSignal:
    """`parts` (micro-batch rows, that teacher's signal over them) as the loss's parts: each
    signal with the flattened token rows of its micro-batch rows."""
    return CompositeSignal(tuple(
        (torch.from_numpy((rows[:, None] * seq + np.arange(seq)).reshape(-1)), signal)
        for rows, signal in parts
    ))  # fmt: skip


class PerDomainTeachers:
    """A `TeacherSource` over one teacher per distinct teacher of `model.teachers`: all
    `OnlineTeacher`s (one tokenizer) or all `CrossTokenizerTeacher`s (`teacher.tokenizer: cross`).

    `teachers`: {teacher: its source}; `domain_teachers`: {domain: teacher} over the
    run's domains, in the order `Batch.rows` indexes them."""

    def __init__(self, teachers: dict, domain_teachers: dict[str, str]):
        self.teachers = teachers
        self.domain_teachers = dict(domain_teachers)
        names = list(teachers)
        self._row_teacher = np.array([names.index(t) for t in domain_teachers.values()])
        self.ppl_source: dict[str, str] = {}
        # the last merged head and which teachers it joins: rebuilt only when they change
        self._head: tuple[tuple[int, ...], torch.Tensor] | None = None

    @property
    def model(self):
        """No one live model: see `teachers`."""
        return None

    @torch.no_grad()
    def signal(self, batch: Batch) -> DenseSignal | CrossSignal | CompositeSignal:
        which = self._row_teacher[np.asarray(batch.rows)[:, 0]]
        parts = []
        for t, teacher in enumerate(self.teachers.values()):
            rows = np.flatnonzero(which == t)
            if len(rows) == len(which):
                # one teacher for the whole micro-batch: its own signal, untouched (sharded
                # teachers without rows here still run below: their forwards are collectives)
                parts.append((rows, teacher.signal(batch)))
            elif len(rows):
                parts.append((rows, teacher.signal(_rows_of(batch, rows))))
            elif teacher.model is not None and is_sharded(teacher.model):
                teacher.signal(_rows_of(batch, np.arange(1)))  # joins the collectives, dropped
        if len(parts) == 1:
            return parts[0][1]
        if not isinstance(parts[0][1], DenseSignal):
            return composite(parts, batch.input_ids.shape[1])
        key = tuple(id(s.head_weight) for _, s in parts)
        if self._head is None or self._head[0] != key:
            self._head = None  # free the old one first
            self._head = (key, merged_head([s for _, s in parts]))
        return merge_dense(parts, *batch.input_ids.shape, head=self._head[1])

    def perplexities(self, split: str) -> dict[str, float] | None:
        merged: dict[str, float] = {}
        sources = set()
        for teacher in self.teachers.values():
            ppl = teacher.perplexities(split)
            if ppl is None:
                return None
            merged.update(ppl)
            sources.add(teacher.ppl_source.get(split))
        self.ppl_source[split] = "computed" if "computed" in sources else sources.pop()
        return {d: merged[d] for d in self.domain_teachers}

    def details(self, split: str) -> dict[str, dict] | None:
        """Each domain's per-byte result from its own teacher (cross-tokenizer teachers, which
        read text; None for teachers that read the student's tokens)."""
        merged: dict[str, dict] = {}
        for teacher in self.teachers.values():
            if not hasattr(teacher, "details"):
                return None
            merged.update(teacher.details(split))
        return {d: merged[d] for d in self.domain_teachers}

    @property
    def ppl_key(self) -> dict:
        """The data's fingerprint and each domain's teacher with its fingerprint (a
        cross-tokenizer teacher's: its tokenizer)."""
        keys = {name: t.ppl_key for name, t in self.teachers.items()}
        first = next(iter(keys.values()))
        return {
            "data": first.get("data"),
            "windows": first.get("windows"),
            "teacher": {
                d: keys[t].get("teacher", keys[t]) for d, t in self.domain_teachers.items()
            },
            "teachers": dict(self.domain_teachers),
            "teacher_cache": None,
        }

    key = ppl_key  # what an offline run's fallback perplexities are recorded under


def _rows_of(batch: Batch, rows: np.ndarray) -> Batch:
    index = torch.from_numpy(rows).to(batch.input_ids.device)
    return Batch(batch.input_ids.index_select(0, index), np.asarray(batch.rows)[rows])
