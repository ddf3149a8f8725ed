"""Aligning two tokenisations of one text by byte offsets (pure; numpy only).

A window's tokens on each side are given as byte ends into the window's text plus a kind per
token (text, BOS or EOS; specials have no text). Each side mirrors the other's specials, so
both streams hold the same specials at the same bytes. Position i of a side (its input token
i, predicting token i + 1) has seen the text [0, ends[i]) and `specials[i]` special tokens.

Two positions, one per side, are **aligned** when they have seen exactly the same: the same
bytes and the same number of specials. Both models then predict the continuation of the same
text. A pair is **exact** when, besides, both next tokens cover the same bytes (or are the same
special): only then are the two next-token distributions over comparable events, and the loss
takes the KL over the token strings the vocabularies share; elsewhere it falls back to a
vocabulary-free distance (`ddk.losses.crosstok`).

A text token of zero width ends inside a multi-byte character (`ddk.data.offsets`): its
position has seen part of a character that the other side cannot have seen, so it is never
aligned, and a position whose next token is one is never exact.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

TEXT, BOS, EOS = 0, 1, 2


class Tokens(NamedTuple):
    """One side's tokens of a window: byte end in the window's text and kind (TEXT/BOS/EOS)."""

    ends: np.ndarray  # [n] int64, nondecreasing, relative to the window's first byte
    kinds: np.ndarray  # [n] int8


class Alignment(NamedTuple):
    """Aligned positions: student_pos[j] and teacher_pos[j] have seen the same text."""

    student_pos: np.ndarray  # [m] int64, increasing
    teacher_pos: np.ndarray  # [m] int64, increasing
    exact: np.ndarray  # [m] bool: both next tokens cover the same bytes


def _positions(tokens: Tokens, scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valid positions, their keys, whether their next token is a whole one): the positions
    that predict a next token and end at a character boundary; a key packs (end, specials
    seen) in one int (`scale` > any specials count, so keys never collide)."""
    ends = np.asarray(tokens.ends, dtype=np.int64)
    kinds = np.asarray(tokens.kinds, dtype=np.int8)
    prev = np.concatenate([[0], ends[:-1]])
    inside = (kinds == TEXT) & (ends == prev)
    specials = np.cumsum(kinds != TEXT)
    pos = np.flatnonzero(~inside[:-1]) if len(ends) > 1 else np.zeros(0, dtype=np.int64)
    return pos, ends[pos] * scale + specials[pos], ~inside[pos + 1]


def align(student: Tokens, teacher: Tokens) -> Alignment:
    """The aligned and exact positions of two tokenisations of one window (module doc)."""
    scale = max(len(student.ends), len(teacher.ends)) + 1
    s_pos, s_keys, s_whole = _positions(student, scale)
    t_pos, t_keys, t_whole = _positions(teacher, scale)
    _, s_idx, t_idx = np.intersect1d(s_keys, t_keys, assume_unique=True, return_indices=True)
    order = np.argsort(s_idx, kind="stable")
    s_idx, t_idx = s_idx[order], t_idx[order]
    sp, tp = s_pos[s_idx], t_pos[t_idx]
    s_next, t_next = sp + 1, tp + 1
    exact = (
        s_whole[s_idx]
        & t_whole[t_idx]
        & (np.asarray(student.kinds)[s_next] == np.asarray(teacher.kinds)[t_next])
        & (np.asarray(student.ends)[s_next] == np.asarray(teacher.ends)[t_next])
    )
    return Alignment(sp.astype(np.int64), tp.astype(np.int64), exact)


def identity_alignment(n: int) -> Alignment:
    """Every position of a window of n tokens with itself, all exact (one tokenizer)."""
    pos = np.arange(max(n - 1, 0), dtype=np.int64)
    return Alignment(pos, pos.copy(), np.ones(len(pos), dtype=bool))


def mismatch_spans(a: Alignment, student: Tokens, teacher: Tokens) -> np.ndarray:
    """[g, 4] (student start, student stop, teacher start, teacher stop) per non-exact aligned
    pair: student rows [start, stop) and teacher positions [start, stop) predict the tokens that
    cover the same bytes, from the pair's shared boundary to the next one (the next aligned
    pair, or the window's end: both sides' last positions have seen all of its text). A span
    that would end on a student token inside a character (a window cut mid-character) is left
    out: its last token's bytes are not in the window."""
    n_s, n_t = len(student.ends), len(teacher.ends)
    s_stop = np.append(a.student_pos[1:], n_s - 1).astype(np.int64)
    t_stop = np.append(a.teacher_pos[1:], n_t - 1).astype(np.int64)
    spans = np.stack([a.student_pos, s_stop, a.teacher_pos, t_stop], axis=1)[~a.exact]
    last = n_s - 1
    cut_inside = (
        n_s > 1 and student.kinds[last] == TEXT and student.ends[last] == student.ends[last - 1]
    )
    if cut_inside:
        spans = spans[spans[:, 1] != last]
    return spans.reshape(-1, 4).astype(np.int64)
