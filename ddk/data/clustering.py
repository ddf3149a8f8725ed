"""Clustering for auto-domains: over-cluster the sample, then merge the pieces by Ward's
criterion over bytes; for `auto`, the most domains that stay distinct from each other.

Why not k-means with N centroids: its objective (squared distance summed over documents)
pays more for a big domain's internal spread than for a small domain's distinctness, so on a
corpus that is 85 % one domain it splits that domain and merges the small ones into it. Here
k-means only cuts the sample into many pieces (OVERCLUSTER per domain asked for), small
domains get pieces of their own, and Ward's criterion joins the pieces, counting each
document by its bytes: joining two pieces costs their size-weighted squared distance, which is
what a language model trained on the merged domain sees per token. Long documents (code
files) weigh what they hold, thousands of short ones (word problems) what they hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

# k-means pieces per domain asked for (for `auto`: per auto_domains_range's high end). 4 and 8
# gave the same domains on the benchmark corpora; 8 leaves more room for small domains.
OVERCLUSTER = 8
# Ward's cost of joining two groups is h * |mean_a - mean_b|^2 with h = size_a * size_b /
# (size_a + size_b); ward_tree raises h to this power. Below 1, distinctness counts for more
# than size: 0.8 kept C and Tcl apart where Ward joined them (the unbalanced corpus after the
# labelled folder's held-out split took half their documents), but split a corpus of word
# problems alone into its 14 templates, where Ward sees one domain. --size-exponents in
# benchmarks/auto_domains.py measures both.
SIZE_EXPONENT = 1.0
# k-means restarts of the over-clustering (the lowest inertia wins). The merge step, not one
# k-means optimum, decides the domains, so a few restarts suffice.
OVERCLUSTER_RESTARTS = 4
# `auto` picks the most domains such that every two differ by at least this cosine distance
# between their mean feature rows, and calls a sample one domain when even its two halves do
# not. `benchmarks/auto_domains.py --cluster-only` prints the distances: the halves of corpora
# of one domain (word problems, English prose, Han prose) 0.12-0.15; the closest two true
# domains of the unbalanced corpus 0.27, of the demo (code and its docstrings) 0.20.
MIN_DOMAIN_DISTANCE = 0.18


@dataclass(frozen=True)
class Merge:
    """One step of the merge tree: nodes `left` and `right` (0..k-1 are the pieces, k+i the
    node step i made) join into node k+step."""

    left: int
    right: int
    cost: float  # the tempered Ward cost (see ward_tree)
    distance: float  # cosine distance between the two groups' mean rows
    docs: tuple[int, int]  # sampled documents on each side


def kmeans_pieces(rows: np.ndarray, weights: np.ndarray, k: int, seed: int):
    """k-means with `k` centroids, each document weighted by `weights` (its bytes)."""
    return KMeans(n_clusters=k, random_state=seed, n_init=OVERCLUSTER_RESTARTS).fit(
        rows, sample_weight=weights
    )


def piece_stats(rows: np.ndarray, weights: np.ndarray, labels: np.ndarray, k: int):
    """Per piece: the weighted mean row, the total weight and the number of documents."""
    sizes = np.bincount(labels, weights=weights, minlength=k)
    docs = np.bincount(labels, minlength=k)
    sums = np.zeros((k, rows.shape[1]))
    np.add.at(sums, labels, rows * weights[:, None])
    means = sums / np.maximum(sizes, 1e-12)[:, None]
    return means, sizes, docs


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 - float(a @ b) / norm if norm > 0 else 1.0


def ward_tree(
    means: np.ndarray, sizes: np.ndarray, docs: np.ndarray, exponent: float | None = None
) -> list[Merge]:
    """Agglomerate k weighted groups (mean row, total weight, documents each) into one by
    Ward's criterion with the size factor tempered: each step joins the pair with the lowest
    (size_a * size_b / (size_a + size_b)) ** exponent * |mean_a - mean_b|^2 (exponent 1: the
    increase of the weighted within-group sum of squares; default SIZE_EXPONENT). Ties go to
    the lowest indices, so the tree is deterministic. Returns the k-1 merges in order."""
    exponent = SIZE_EXPONENT if exponent is None else exponent
    k = len(means)
    means = np.asarray(means, dtype=np.float64).copy()
    sizes = np.asarray(sizes, dtype=np.float64).copy()
    docs = np.asarray(docs).astype(int).copy()
    node = np.arange(k)
    alive = np.ones(k, dtype=bool)

    def costs_to(i: int) -> np.ndarray:
        sq = ((means - means[i]) ** 2).sum(1)
        c = (sizes * sizes[i] / np.maximum(sizes + sizes[i], 1e-12)) ** exponent * sq
        c[~alive] = np.inf
        c[i] = np.inf
        return c

    cost = np.full((k, k), np.inf)
    for i in range(k):
        cost[i] = costs_to(i)
    merges = []
    for step in range(k - 1):
        flat = int(np.argmin(cost))
        i, j = divmod(flat, k)
        i, j = min(i, j), max(i, j)
        merges.append(
            Merge(
                left=int(node[i]),
                right=int(node[j]),
                cost=float(cost[i, j]),
                distance=_cosine_distance(means[i], means[j]),
                docs=(int(docs[i]), int(docs[j])),
            )
        )
        total = sizes[i] + sizes[j]
        means[i] = (sizes[i] * means[i] + sizes[j] * means[j]) / max(total, 1e-12)
        sizes[i], docs[i], node[i] = total, docs[i] + docs[j], k + step
        alive[j] = False
        cost[j, :] = cost[:, j] = np.inf
        cost[i] = costs_to(i)
        cost[:, i] = cost[i]
    return merges


def cut_tree(merges: list[Merge], k: int, n: int) -> np.ndarray:
    """piece -> cluster (0..n-1, numbered by their lowest piece) after the first k-n merges."""
    parent = list(range(k + len(merges)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for step, m in enumerate(merges[: k - n]):
        parent[root(m.left)] = parent[root(m.right)] = k + step
    roots = [root(i) for i in range(k)]
    number = {r: c for c, r in enumerate(dict.fromkeys(roots))}
    return np.array([number[r] for r in roots])


def closest_pair(rows: np.ndarray, weights: np.ndarray, labels: np.ndarray, min_docs: int):
    """The smallest cosine distance between the weighted mean rows of two clusters in
    `labels` (clusters of fewer than `min_docs` documents left out; inf when < 2 remain)."""
    n = int(labels.max()) + 1
    means, _, docs = piece_stats(rows, weights, labels, n)
    means = means[docs >= min_docs]
    if len(means) < 2:
        return float("inf")
    unit = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    dist = 1.0 - unit @ unit.T
    np.fill_diagonal(dist, np.inf)
    return float(dist.min())
