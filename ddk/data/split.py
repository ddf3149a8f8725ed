"""Which documents are held out for validation and test, and the windows they give (pure; no
files).

Held-out documents are drawn per domain in a seeded random order, whole. A held-out window is
one document's tokens `[j*seq_len, j*seq_len + seq_len + 1)`, never another document's: a document
of n tokens has n - 1 targets and gives ceil((n - 1) / seq_len) windows, at most
`per_document_cap` of them. So a long document's remainder scores instead of being thrown away,
while a split of w windows still draws from at least w / cap documents, and from at least
MIN_DOCUMENTS (one per window in a split of fewer): one long book cannot fill a split, and a
small split is not a handful of documents whose perplexity says mostly which ones were drawn.
The two splits fill together (each document goes to the split that is proportionally emptier),
so a domain short of documents shortens both alike. A document is skipped (kept for training)
when holding it out would take the domain's held-out documents past `budget` tokens, so training
keeps most of a domain.

Texts are compared by hash across the whole prepared folder: a text is held out at most once
(in one split of one domain), so a text that another domain already holds out is never drawn,
and every training copy of a held-out text, in any domain, is dropped (`split_codes`).
"""

from __future__ import annotations

import numpy as np

# How held-out windows are cut; perplexities stored by other components (the teacher-perplexity
# cache, a teacher cache) record it, and ones measured under another rule are not reused.
HELDOUT_WINDOWS = "one-document"
DROPPED = -1  # a copy of a held-out text: in no split
TRAIN = 0
HELDOUT = {"val": 1, "test": 2}
MIN_DOCUMENTS = 32  # a held-out split draws from at least this many documents (or one a window)


def per_document_cap(windows: int, most: int) -> int:
    """Windows one document may give to a split of `windows`: at most `most`, and few enough
    that the split draws from at least MIN_DOCUMENTS documents (one per window when smaller)."""
    return max(1, min(most, windows // MIN_DOCUMENTS))


def document_windows(lens: np.ndarray, seq_len: int) -> np.ndarray:
    """Windows each document gives: one per `seq_len` of its `lens - 1` targets (0 for a
    document of one token, which has no target)."""
    lens = np.asarray(lens, dtype=np.int64)
    return np.where(lens >= 2, (lens - 2) // seq_len + 1, 0)


def kept_tokens(windows: np.ndarray, lens: np.ndarray, seq_len: int) -> np.ndarray:
    """Tokens a held-out document keeps for `windows` windows: its first windows * seq_len + 1."""
    return np.minimum(np.asarray(lens, dtype=np.int64), np.asarray(windows) * seq_len + 1)


def window_spans(stored: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, tokens) of every window of a held-out split file that holds `stored[i]` tokens of
    document i back to back. Window j of a document starts at its token j*seq_len and holds up
    to seq_len + 1 tokens (seq_len targets), never past the document's end; consecutive windows
    of one document share one token (the last input of one is the first of the next)."""
    stored = np.asarray(stored, dtype=np.int64)
    per_doc = document_windows(stored, seq_len)
    doc_start = np.concatenate([[0], np.cumsum(stored)[:-1]]).astype(np.int64)
    doc = np.repeat(np.arange(len(stored)), per_doc)
    first = np.concatenate([[0], np.cumsum(per_doc)[:-1]]).astype(np.int64)
    j = np.arange(len(doc), dtype=np.int64) - np.repeat(first, per_doc)
    starts = doc_start[doc] + j * seq_len
    lengths = np.minimum(seq_len + 1, stored[doc] - j * seq_len)
    return starts, lengths


def choose_heldout(
    lens: np.ndarray,
    hashes: np.ndarray,
    order: np.ndarray,
    seq_len: int,
    windows: dict[str, int],
    budget: int,
    *,
    per_document: int = 1,
    taken: set[int] | frozenset[int] = frozenset(),
) -> dict[str, list[tuple[int, int]]]:
    """Per held-out split, its documents in draw order as (document, windows it gives).

    lens: tokens per document; hashes: its text hash; order: the draw order (a permutation);
    windows: windows wanted per held-out split; budget: most tokens (whole-document lengths)
    the held-out documents may take in all; per_document: the setting `per_document_cap` turns
    into the most windows one document gives to each split;
    taken: hashes held out elsewhere (other domains): such documents are never drawn. A split
    gets exactly its windows when the domain has enough documents (the last document drawn
    gives only the windows still missing).
    """
    have = dict.fromkeys(windows, 0)
    drawn: dict[str, list[tuple[int, int]]] = {s: [] for s in windows}
    gives = document_windows(lens, seq_len)
    cap = {s: per_document_cap(n, per_document) for s, n in windows.items()}
    held: set[int] = set()
    used = 0
    for i in order.tolist():
        open_splits = [s for s in windows if have[s] < windows[s]]
        if not open_splits:
            break
        length, h = int(lens[i]), int(hashes[i])
        if gives[i] == 0 or h in held or h in taken or used + length > budget:
            continue
        split = min(open_splits, key=lambda s: have[s] / windows[s])
        n = min(int(gives[i]), cap[split], windows[split] - have[split])
        drawn[split].append((i, n))
        have[split] += n
        used += length
        held.add(h)
    return drawn


def split_codes(
    n_docs: int, hashes: np.ndarray, drawn: dict[str, list[tuple[int, int]]], held: np.ndarray
) -> np.ndarray:
    """Each document's split code: HELDOUT[split] for the drawn ones, DROPPED for any other copy
    of a text in `held` (sorted hashes held out anywhere in the folder), TRAIN for the rest."""
    codes = np.full(n_docs, TRAIN, dtype=np.int8)
    if len(held):
        pos = np.minimum(np.searchsorted(held, hashes), len(held) - 1)
        codes[held[pos] == hashes] = DROPPED
    for split, docs in drawn.items():
        codes[[i for i, _ in docs]] = HELDOUT[split]
    return codes
