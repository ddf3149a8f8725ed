"""An engine's per-position log-probs (vLLM's offline `prompt_logprobs`, or a server's JSON) as
the sparse top-k signal: the k most likely in-vocabulary ids, their log-probs and the tail mass
1 − Σ top-k at τ = 1. Shared by the vLLM engine and the served teacher."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ddk.errors import DDKError
from ddk.teacher.signals import SparseSignal

Entry = tuple[int, float, int]  # (token id, log-prob, rank: 1 = most likely)


def top_entries(entries: Iterable[Entry], k: int, vocab: int) -> tuple[list[int], list[float]]:
    """The k most likely in-vocabulary ids of one position and their log-probs. The entries are
    the engine's top ones plus, for a prompt position, the prompt token's own (which joins them
    when it is not among them); ids past `vocab` (a padded head's rows) are skipped."""
    ranked = sorted(entries, key=lambda e: (-e[1], e[2], e[0]))
    top = [(tid, lp) for tid, lp, _ in ranked if tid < vocab][:k]
    if len(top) < k:
        raise DDKError(
            f"the teacher engine returned {len(top)} in-vocabulary log-probs where "
            f"teacher.cache_k is {k} (padding rows of the teacher's head rank among the most "
            "likely); lower teacher.cache_k"
        )
    return [t for t, _ in top], [lp for _, lp in top]


def sparse_rows(positions: list[Iterable[Entry]], k: int, vocab: int) -> SparseSignal:
    """The top-k signal of each position's entries: rows in order, log_tail = log(1 − Σ top-k)
    in float64 (-inf when the k ids carry all the mass to float32 precision)."""
    ids = np.zeros((len(positions), k), dtype=np.int64)
    logp = np.zeros((len(positions), k), dtype=np.float32)
    for row, entries in enumerate(positions):
        ids[row], logp[row] = top_entries(entries, k, vocab)
    mass = np.exp(logp.astype(np.float64)).sum(axis=1)
    with np.errstate(divide="ignore"):
        log_tail = np.log(np.clip(1.0 - mass, 0.0, None))
    return SparseSignal(torch.from_numpy(ids), torch.from_numpy(logp), torch.from_numpy(log_tail))
