"""Which documents of a domain are held out for validation and test (pure; no files).

Held-out documents are drawn in a seeded random order, whole. Each contributes at most
`seq_len` tokens to its split, so a split of n windows comes from at least n documents and one
long book cannot fill it. The two splits fill together (each document goes to the split that is
proportionally emptier), so a domain short of documents shortens both alike. A document is
skipped (kept for training) when holding it out would take the held-out documents past
`budget` tokens, so training keeps most of a domain. Exact duplicates (same text hash) of a
held-out document are never held out twice and are dropped from training.
"""

from __future__ import annotations

import numpy as np

DROPPED = -1  # an exact duplicate of a held-out document: in no split
TRAIN = 0
HELDOUT = {"val": 1, "test": 2}


def choose_heldout(
    lens: np.ndarray,
    hashes: np.ndarray,
    order: np.ndarray,
    seq_len: int,
    windows: dict[str, int],
    budget: int,
) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Assign each document a split code (TRAIN, HELDOUT[split] or DROPPED).

    lens: tokens per document; hashes: its text hash; order: the draw order (a permutation);
    windows: windows wanted per held-out split (each needs n * seq_len + 1 tokens);
    budget: most tokens (whole-document lengths) the held-out documents may take in all.
    Returns the codes and, per held-out split, its documents in draw order.
    """
    need = {s: n * seq_len + 1 for s, n in windows.items()}
    have = dict.fromkeys(windows, 0)
    drawn: dict[str, list[int]] = {s: [] for s in windows}
    codes = np.full(len(lens), TRAIN, dtype=np.int8)
    held_hashes: set[int] = set()
    used = 0
    for i in order.tolist():
        open_splits = [s for s in windows if have[s] < need[s]]
        if not open_splits:
            break
        length = int(lens[i])
        if int(hashes[i]) in held_hashes or used + length > budget:
            continue
        split = min(open_splits, key=lambda s: have[s] / need[s])
        codes[i] = HELDOUT[split]
        drawn[split].append(i)
        have[split] += min(length, seq_len)
        used += length
        held_hashes.add(int(hashes[i]))
    if held_hashes:
        is_dup = np.isin(hashes, np.fromiter(held_hashes, dtype=hashes.dtype))
        codes[(codes == TRAIN) & is_dup] = DROPPED
    return codes, drawn
