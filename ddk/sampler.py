"""Per-interval training subsets drawn by domain weight (DDK Algorithm 1, step 2).

For each distillation interval the trainer asks :meth:`DomainSampler.plan_interval`
for the ``num_sequences`` training sequences of the next K steps:

1. Per-domain counts are ``weights * num_sequences`` rounded by the largest-remainder
   method, so each domain's share is exact up to ``1/num_sequences``; ties in the
   remainders go to the lower domain index. A domain of weight 0 gets no rows.
2. Each domain's sequences are read in order from that domain's current *epoch
   permutation* (a permutation of ``range(size)`` seeded by ``(seed, domain index,
   epoch)``). When a domain is exhausted, a new, reshuffled epoch starts (so a tiny
   domain may cycle through several epochs in one interval), and every sequence is
   seen exactly once per epoch.
3. The rows are shuffled with a generator seeded by ``(seed, interval)``.

The plan is a deterministic function of ``(seed, interval, weights, state)``; the state
(per-domain epoch and position) is what :meth:`DomainSampler.state_dict` saves.

Seeding: ``np.random.default_rng([seed, 0, domain_index, epoch])`` for permutations and
``np.random.default_rng([seed, 1, interval])`` for the row shuffle. The middle tag keeps
the two streams apart (``SeedSequence`` treats a trailing 0 as absent, so without it
``[seed, d, 0]`` would equal ``[seed, d]``).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["DomainSampler"]

_PERMUTATION_TAG = 0
_SHUFFLE_TAG = 1
_WEIGHT_SUM_TOL = 1e-6


def _plain_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return int(value)


def largest_remainder_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` with ``|count[i] - weights[i]*total| < 1``.

    ``weights`` must be >= 0 and sum to 1. Leftover units go to the largest fractional
    parts; ties go to the lower index; zero weights never get a unit.
    """
    quotas = weights * total
    counts = np.floor(quotas).astype(np.int64)
    remainder = int(total - counts.sum())
    if remainder > 0:
        eligible = np.flatnonzero(weights > 0)
        fractions = quotas[eligible] - counts[eligible]
        # Stable sort on the negated fraction: largest first, lower index first on ties.
        order = eligible[np.argsort(-fractions, kind="stable")]
        for k in range(remainder):  # remainder <= len(order) up to float rounding
            counts[order[k % len(order)]] += 1
    elif remainder < 0:  # only from float rounding; take units back from the smallest parts
        eligible = np.flatnonzero(counts > 0)
        fractions = quotas[eligible] - counts[eligible]
        order = eligible[np.argsort(fractions, kind="stable")]
        for k in range(-remainder):
            counts[order[k % len(order)]] -= 1
    return counts


class DomainSampler:
    """Draws each interval's training sequences by domain weight; resumable via ``state_dict``.

    ``num_sequences`` maps each domain (in the order the weights use) to the number of
    training sequences available in it; every domain needs at least one.
    """

    def __init__(self, num_sequences: Mapping[str, int], seed: int) -> None:
        if not isinstance(num_sequences, Mapping) or not num_sequences:
            raise ValueError("DomainSampler needs a non-empty {domain: number of sequences} dict")
        self.seed = _plain_int(seed, "seed")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self._domains: list[str] = []
        self._sizes: list[int] = []
        for domain, size in num_sequences.items():
            size = _plain_int(size, f"number of sequences of domain {domain!r}")
            if size <= 0:
                raise ValueError(
                    f"domain {domain!r} has {size} training sequences; every domain needs at least 1"
                )
            self._domains.append(str(domain))
            self._sizes.append(size)
        self._index = {d: i for i, d in enumerate(self._domains)}
        self._epoch = [0] * len(self._domains)
        self._position = [0] * len(self._domains)
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    # ------------------------------------------------------------------ accessors
    @property
    def domains(self) -> list[str]:
        """Domain names, in weight order."""
        return list(self._domains)

    @property
    def domain_sizes(self) -> dict[str, int]:
        """``{domain: number of training sequences}``."""
        return dict(zip(self._domains, self._sizes))

    def _domain_index(self, domain: str | int) -> int:
        if isinstance(domain, str):
            if domain not in self._index:
                raise KeyError(f"unknown domain {domain!r}; known: {self._domains}")
            return self._index[domain]
        i = _plain_int(domain, "domain index")
        if not 0 <= i < len(self._domains):
            raise KeyError(f"domain index {i} out of range for {len(self._domains)} domains")
        return i

    def epochs_completed(self, domain: str | int) -> int:
        """How many full passes over ``domain`` (name or index) have been handed out."""
        return self._epoch[self._domain_index(domain)]

    def position(self, domain: str | int) -> int:
        """Index into the current epoch permutation of ``domain`` of the next sequence."""
        return self._position[self._domain_index(domain)]

    def epoch_permutation(self, domain: str | int, epoch: int) -> np.ndarray:
        """The order in which ``domain``'s sequences are read during ``epoch``."""
        d = self._domain_index(domain)
        rng = np.random.default_rng([self.seed, _PERMUTATION_TAG, d, int(epoch)])
        return rng.permutation(self._sizes[d]).astype(np.int64, copy=False)

    def _current_permutation(self, d: int) -> np.ndarray:
        cached = self._perm_cache.get(d)
        if cached is None or cached[0] != self._epoch[d]:
            cached = (self._epoch[d], self.epoch_permutation(d, self._epoch[d]))
            self._perm_cache[d] = cached
        return cached[1]

    # ------------------------------------------------------------------ interval arithmetic
    @staticmethod
    def interval_of(step: int, K: int) -> int:
        """The distillation interval that optimizer step ``step`` (0-based) belongs to."""
        return step // K

    @staticmethod
    def step_rows(plan: np.ndarray, step: int, K: int, sequences_per_step: int) -> np.ndarray:
        """The ``[sequences_per_step, 2]`` rows of ``plan`` (its interval's) for ``step``."""
        offset = (step % K) * sequences_per_step
        return plan[offset : offset + sequences_per_step]

    # ------------------------------------------------------------------ planning
    def _check_weights(self, weights: Sequence[float] | np.ndarray) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64)
        n = len(self._domains)
        if w.ndim != 1 or w.size != n:
            raise ValueError(f"weights must have one entry per domain ({n}), got shape {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
        total = float(w.sum())
        if abs(total - 1.0) > _WEIGHT_SUM_TOL:
            raise ValueError(f"weights must sum to 1, sum to {total}")
        return w / total

    def domain_counts(
        self, weights: Sequence[float] | np.ndarray, num_sequences: int
    ) -> np.ndarray:
        """Rows per domain for an interval of ``num_sequences`` (largest-remainder rounding)."""
        total = _plain_int(num_sequences, "num_sequences")
        if total < 0:
            raise ValueError(f"num_sequences must be >= 0, got {total}")
        return largest_remainder_counts(self._check_weights(weights), total)

    def _take(self, d: int, count: int) -> np.ndarray:
        """The next ``count`` sequence indices of domain ``d``, starting new epochs as needed."""
        size = self._sizes[d]
        parts = []
        while count > 0:
            pos = self._position[d]
            take = min(count, size - pos)
            parts.append(self._current_permutation(d)[pos : pos + take])
            count -= take
            pos += take
            if pos == size:  # domain exhausted: the next read starts a reshuffled epoch
                self._epoch[d] += 1
                pos = 0
            self._position[d] = pos
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def plan_interval(
        self, interval: int, weights: Sequence[float] | np.ndarray, num_sequences: int
    ) -> np.ndarray:
        """The shuffled ``[num_sequences, 2]`` int64 rows ``(domain_index, sequence_index)``.

        Advances the per-domain epoch/position state. ``weights`` needs one entry per
        domain, ``>= 0``, summing to 1 (within 1e-6); otherwise ``ValueError``.
        """
        interval = _plain_int(interval, "interval")
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval}")
        counts = self.domain_counts(weights, num_sequences)
        total = int(counts.sum())
        rows = np.empty((total, 2), dtype=np.int64)
        start = 0
        for d, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            rows[start : start + count, 0] = d
            rows[start : start + count, 1] = self._take(d, count)
            start += count
        shuffle = np.random.default_rng([self.seed, _SHUFFLE_TAG, interval])
        return rows[shuffle.permutation(total)]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, dict[str, int]]:
        """JSON-serialisable ``{"epoch": {domain: int}, "position": {domain: int}}``."""
        return {
            "epoch": {d: int(e) for d, e in zip(self._domains, self._epoch)},
            "position": {d: int(p) for d, p in zip(self._domains, self._position)},
        }

    def load_state_dict(self, state: Mapping[str, Mapping[str, int]]) -> None:
        """Restore a :meth:`state_dict`; the domains must be the same as this sampler's."""
        try:
            epochs, positions = state["epoch"], state["position"]
        except (KeyError, TypeError):
            raise ValueError("sampler state must have 'epoch' and 'position' entries") from None
        for name, table in (("epoch", epochs), ("position", positions)):
            if set(table) != set(self._domains):
                raise ValueError(
                    f"sampler state '{name}' has domains {sorted(table)}, "
                    f"this sampler has {sorted(self._domains)}"
                )
        new_epoch, new_position = [], []
        for d, domain in enumerate(self._domains):
            e = _plain_int(epochs[domain], f"epoch of domain {domain!r}")
            p = _plain_int(positions[domain], f"position of domain {domain!r}")
            if e < 0:
                raise ValueError(f"epoch of domain {domain!r} must be >= 0, got {e}")
            if not 0 <= p < self._sizes[d]:
                raise ValueError(
                    f"position {p} of domain {domain!r} is outside its {self._sizes[d]} sequences "
                    "(did the prepared data change?)"
                )
            new_epoch.append(e)
            new_position.append(p)
        self._epoch, self._position = new_epoch, new_position
        self._perm_cache.clear()
