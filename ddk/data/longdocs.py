"""Tokenising a very long document in bounded pieces.

A fast tokenizer needs working memory of about 100x the text it encodes at once, so a 50 MB
one-line document would take about 6 GB. Documents longer than `PIECE_CHARS` are cut into pieces
at a space between two non-space characters: GPT-2 and Qwen style pre-tokenisers never join
such a space to the character before it, so the pieces' ids, concatenated, equal the whole
document's ids. Only a piece with no such space in its second half is cut elsewhere.
"""

from __future__ import annotations

import numpy as np

PIECE_CHARS = 1 << 18
_GROUP = 4  # pieces encoded in one batch call: bounds the tokenizer's working memory


def _cut(text: str, lo: int, hi: int) -> int:
    """Where a piece starting at `lo` ends (`hi` < len(text) is the most it may hold)."""
    floor = lo + (hi - lo) // 2  # never cut pieces shorter than half the limit
    i = text.rfind(" ", floor, hi)
    while i > floor:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", floor, i)
    # No lone space: cut before any whitespace that starts a word, else anywhere.
    for i in range(hi - 1, floor, -1):
        if text[i].isspace() and not text[i + 1].isspace():
            return i
    return hi


def split_at_whitespace(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """`text` in pieces of at most `limit` characters that join back to it."""
    pieces = []
    start = 0
    while len(text) - start > limit:
        end = _cut(text, start, start + limit)
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def encode_documents(encode, texts: list[str], limit: int | None = None) -> list:
    """Token ids per document (no special tokens); `encode` is a fast tokenizer's batch encode.
    Long documents come back as int64 arrays, the rest as lists."""
    limit = limit or PIECE_CHARS
    out: list = [None] * len(texts)
    short = [i for i, t in enumerate(texts) if len(t) <= limit]
    if short:
        encoded = encode([texts[i] for i in short], add_special_tokens=False)
        for i, enc in zip(short, encoded):
            out[i] = enc.ids
    for i, text in enumerate(texts):
        if out[i] is not None:
            continue
        pieces = split_at_whitespace(text, limit)
        parts = []
        for g in range(0, len(pieces), _GROUP):
            for enc in encode(pieces[g : g + _GROUP], add_special_tokens=False):
                parts.append(np.asarray(enc.ids, dtype=np.int64))
        out[i] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return out
