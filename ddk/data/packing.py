"""Whole conversations into fixed-length rows, and reading them back as isolated sequences (pure).

Chat data stores one mask byte per token beside the tokens (`<split>.mask`): bit TARGET says the
token is a loss target (predicted from the token before it), bit START that it begins a
sequence (a conversation, or the padding after the last one of a row). A row's conversations
never attend to each other: each restarts its position ids at 0, and Hugging Face models turn
position ids that restart into a block-diagonal causal mask (sdpa, eager, flex) or the varlen
path (flash-attention 2).
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np

TARGET = 1
START = 2
MASK_SUFFIX = ".mask"


def pack_rows(lens: np.ndarray, row_len: int, packing: str) -> list[list[int]]:
    """Conversation indices per row. 'padded': one per row; 'isolated': best-fit decreasing
    (each conversation, longest first, goes to the fullest row it still fits in). Every length
    must be at most `row_len`."""
    lens = np.asarray(lens, dtype=np.int64)
    if packing == "padded":
        return [[i] for i in range(len(lens))]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in np.argsort(-lens, kind="stable").tolist():
        n = int(lens[i])
        k = bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            if room - n > 0:
                insort(free, (room - n, r))
        else:
            rows.append([i])
            if row_len - n > 0:
                insort(free, (row_len - n, len(rows) - 1))
    return rows


def fill_rows(rows, ids, masks, row_len: int, pad: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask bytes) of the packed rows back to back plus one trailing padding token
    (window r is tokens[r*row_len : (r+1)*row_len + 1], as for raw text)."""
    n = len(rows) * row_len + 1
    tokens = np.full(n, pad, dtype=dtype)
    bytes_ = np.zeros(n, dtype=np.uint8)
    for r, members in enumerate(rows):
        pos = r * row_len
        for i in members:
            k = len(ids[i])
            tokens[pos : pos + k] = ids[i]
            bytes_[pos : pos + k] = masks[i] & TARGET
            bytes_[pos] |= START
            pos += k
        if pos < (r + 1) * row_len:
            bytes_[pos] = START  # the row's padding is a sequence of its own
    bytes_[-1] = START
    return tokens, bytes_


def conversation_bytes(mask: np.ndarray) -> np.ndarray:
    """The stored mask bytes of one conversation: its targets, and START on its first token."""
    out = (np.asarray(mask, dtype=np.uint8) & TARGET).astype(np.uint8)
    if len(out):
        out[0] |= START
    return out


def position_ids(mask_bytes: np.ndarray) -> np.ndarray:
    """int64 [..., T]: each token's position inside its sequence; the first token of each row
    starts one."""
    mb = np.asarray(mask_bytes)
    starts = (mb & START) != 0
    starts[..., 0] = True
    index = np.broadcast_to(np.arange(mb.shape[-1]), mb.shape)
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return (index - last_start).astype(np.int64)
