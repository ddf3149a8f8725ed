"""Domains for a corpus without (fine enough) labels: cluster documents, name the clusters and
relabel the document stream that `ddk prepare` tokenises, so the output has the usual layout.

Two passes over the corpus keep memory bounded: pass 1 keeps a seeded reservoir sample of
`prepare.cluster_sample` documents (per labelled domain for --split-domains) and fits on it the
features (ddk.data.embed), k-means pieces and the tree that joins them into domains
(ddk.data.clustering); pass 2 streams every document through in batches, assigns it to the
nearest piece, hence its domain, and hands it on. Names: ddk.data.naming. Also here: dropping documents that another prepared
folder holds out (`prepare.exclude_heldout`), so a model trained on this data can be scored on
that folder's true domains.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from tqdm.auto import tqdm

from ddk.config import PrepareSection
from ddk.data import clustering
from ddk.data.dedup import HASH_DTYPE, text_hash
from ddk.data.embed import EmbedModel, make_embedder
from ddk.data.manifest import domain_path, read_array, read_manifest
from ddk.data.naming import cluster_name as cluster_name  # re-exported (tests, callers)
from ddk.data.naming import distinctive_terms, name_clusters
from ddk.data.sources import Corpus, iter_documents
from ddk.errors import DDKError

ASSIGNMENTS = "assignments.jsonl"
CLUSTERS = "clusters.json"
HELDOUT_HASHES = "heldout_hashes.npy"
ASSIGN_BATCH = 256  # documents embedded at once in pass 2 (and the most held in memory)
MIN_CLUSTER_DOCS = 3  # sample documents a cluster needs; fewer: merged into the nearest one
_SNIPPET_CHARS = 160
_NAME_TERMS = 3
_WORD = r"(?u)\b[^\W\d_]{2,}\b"  # naming terms: words of letters, no numbers


def active(cfg: PrepareSection) -> bool:
    return (
        cfg.auto_domains is not None
        or cfg.split_domains is not None
        or cfg.exclude_heldout is not None
    )


def fingerprint(cfg: PrepareSection) -> dict:
    """The settings that change which documents land in which domain (empty when unused, so a
    labelled folder's fingerprint is what it always was)."""
    if not active(cfg):
        return {}
    keys = ("auto_domains", "split_domains", "embedder", "embed_model", "cluster_sample")
    out = {k: getattr(cfg, k) for k in keys}
    out["auto_domains_range"] = list(cfg.auto_domains_range)
    if cfg.exclude_heldout:
        out["exclude_heldout"] = str(Path(cfg.exclude_heldout).expanduser().resolve())
    return out


def check_settings(cfg: PrepareSection) -> None:
    n = cfg.auto_domains
    if n is not None and cfg.split_domains is not None:
        raise DDKError(
            "prepare.auto_domains and prepare.split_domains exclude each other: auto_domains "
            "ignores labels, split_domains splits each labelled domain; choose one"
        )
    if isinstance(n, int) and n < 2:
        raise DDKError(f"prepare.auto_domains must be at least 2 (or 'auto'), got {n}")
    lo, hi = cfg.auto_domains_range
    if n == "auto" and not 2 <= lo <= hi:
        raise DDKError(
            f"prepare.auto_domains_range must be [low, high] with 2 <= low <= high, got {[lo, hi]}"
        )


# --------------------------------------------------------------------------- pure helpers


def reservoir_add(sample: list, seen: int, item, capacity: int, rng: np.random.Generator) -> None:
    """Algorithm R: after n calls `sample` is a uniform draw of min(n, capacity) items.
    `seen` counts the items offered before this one."""
    if seen < capacity:
        sample.append(item)
    else:
        j = int(rng.integers(0, seen + 1))
        if j < capacity:
            sample[j] = item


def snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _SNIPPET_CHARS else flat[: _SNIPPET_CHARS - 1] + "…"


# --------------------------------------------------------------------------- fitting


@dataclass
class GroupModel:
    """The clustering of one group: the whole corpus, or one labelled domain when splitting."""

    embedder: object
    kmeans: object  # the over-clustering: pieces of the sample
    label_map: np.ndarray  # piece -> cluster index
    names: list[str]
    terms: list[list[str]]
    basis: list[dict]  # what each name is based on: code language, script, terms, characters
    examples: list[list[str]]
    sample_sizes: list[int]
    auto: dict = field(default_factory=dict)  # how N was picked (auto_domains='auto')

    def assign(self, texts: list[str]) -> list[str]:
        labels = self.label_map[self.kmeans.predict(self.embedder.transform(texts))]
        return [self.names[i] for i in labels]


def pick_n(
    rows: np.ndarray,
    weights: np.ndarray,
    pieces: np.ndarray,
    merges: list[clustering.Merge],
    lo: int,
    hi: int,
    prefix: str,
    log,
) -> tuple[int, dict]:
    """N for auto_domains='auto': the largest N in [lo, hi] whose cut of the merge tree leaves
    every two domains at least clustering.MIN_DOMAIN_DISTANCE apart. One line and stop when
    even two are closer: the sample is one domain."""
    k = len(merges) + 1
    closest = {
        n: clustering.closest_pair(
            rows, weights, clustering.cut_tree(merges, k, n)[pieces], MIN_CLUSTER_DOCS
        )
        for n in range(2, hi + 1)
    }
    where = prefix or "the corpus"
    if closest[2] < clustering.MIN_DOMAIN_DISTANCE:
        raise DDKError(
            f"{where} looks like one domain: split in two, its halves differ by "
            f"{closest[2]:.2f} (cosine distance of mean features; distinct domains differ by at "
            f"least {clustering.MIN_DOMAIN_DISTANCE}), so auto-domains has nothing to split; "
            "prepare it without --auto-domains, or give a number of domains to split it anyway"
        )
    n = max(m for m, d in closest.items() if d >= clustering.MIN_DOMAIN_DISTANCE)
    n = min(max(n, lo), hi)
    log(
        f"{prefix or 'auto-domains'}: N={n}, the most domains whose closest two differ by at "
        f"least {clustering.MIN_DOMAIN_DISTANCE} (cosine distance of mean features); closest "
        "pair by N: " + ", ".join(f"{m}={d:.2f}" for m, d in closest.items())
    )
    return n, {
        "picked": n,
        "min_domain_distance": clustering.MIN_DOMAIN_DISTANCE,
        "closest_pair_by_n": {str(m): round(d, 4) for m, d in closest.items()},
        "range": [lo, hi],
    }


def _merge_tiny(labels: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Map cluster labels to kept clusters: one with fewer than MIN_CLUSTER_DOCS sampled
    documents joins the kept cluster whose centroid is most similar (cosine)."""
    k = len(centroids)
    sizes = np.bincount(labels, minlength=k)
    keep = np.flatnonzero(sizes >= MIN_CLUSTER_DOCS)
    mapping = np.arange(k)
    if len(keep) == 0:
        return mapping
    unit = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    for c in np.flatnonzero(sizes < MIN_CLUSTER_DOCS):
        mapping[c] = keep[int(np.argmax(unit[keep] @ unit[c]))]
    return mapping


def fit_group(
    texts: list[str], n, cfg: PrepareSection, embed_model: EmbedModel, prefix: str, log
) -> GroupModel:
    """Fit the features and the clustering on `texts` (the sample) for n domains ('auto':
    n from the merge tree): k-means pieces, joined by Ward's criterion over bytes."""
    distinct = len(set(texts))
    if n == "auto" and distinct < 2:
        raise DDKError(
            f"{prefix or 'the corpus'}: auto-domains needs at least 2 distinct documents, "
            f"but the {len(texts):,} sampled are all the same text; add text"
        )
    if n != "auto" and n > distinct:
        raise DDKError(
            f"{prefix or 'the corpus'}: {n} domains asked but only {distinct} distinct documents "
            "were sampled; lower prepare.auto_domains/split_domains or raise "
            "prepare.cluster_sample (or add text)"
        )
    embedder = make_embedder(cfg.embedder, cfg.seed, embed_model).fit(texts)
    rows = embedder.transform(texts)
    weights = np.array([max(len(t.encode("utf-8")), 1) for t in texts], dtype=np.float64)
    lo, hi = cfg.auto_domains_range if n == "auto" else (n, n)
    k = min(clustering.OVERCLUSTER * hi, distinct)
    kmeans = clustering.kmeans_pieces(rows, weights, k, cfg.seed)
    pieces = kmeans.predict(rows)
    means, sizes, docs = clustering.piece_stats(rows, weights, pieces, k)
    merges = clustering.ward_tree(means, sizes, docs)
    auto: dict = {}
    if n == "auto" and cfg.embedder != "hashing":
        log(
            f"{prefix or 'auto-domains'}: auto's distance threshold was measured with the "
            f"hashing features; with '{cfg.embedder}' features check the closest pairs below "
            "and give N if they look off"
        )
    if n == "auto":
        n, auto = pick_n(rows, weights, pieces, merges, lo, min(hi, k), prefix, log)
    label_map = clustering.cut_tree(merges, k, n)
    labels = label_map[pieces]
    centroids, _, _ = clustering.piece_stats(rows, weights, labels, n)
    merged = _merge_tiny(labels, centroids)
    if (merged != np.arange(n)).any():
        log(
            f"{prefix or 'auto-domains'}: {int((merged != np.arange(n)).sum())} cluster(s) with "
            f"fewer than {MIN_CLUSTER_DOCS} sampled documents merged into their nearest cluster"
        )
    labels = merged[labels]
    # Cluster indices by sampled size (largest first), so c0 is the biggest domain.
    kept = sorted(set(labels.tolist()), key=lambda c: (-int((labels == c).sum()), c))
    index_of = {c: i for i, c in enumerate(kept)}
    label_map = np.array([index_of[int(merged[c])] for c in label_map])
    final = label_map[pieces]
    members = [[texts[j] for j in np.flatnonzero(final == i)] for i in range(len(kept))]
    terms = _terms(texts, final, len(kept))
    names, basis = name_clusters(members, terms)
    names = [(prefix + "." if prefix else "") + name for name in names]
    examples = [[snippet(t) for t in m[:3]] for m in members]
    sizes_out = [len(m) for m in members]
    return GroupModel(embedder, kmeans, label_map, names, terms, basis, examples, sizes_out, auto)


def _terms(texts: list[str], labels: np.ndarray, k: int) -> list[list[str]]:
    try:
        vec = TfidfVectorizer(token_pattern=_WORD, max_features=20000, sublinear_tf=True)
        x = vec.fit_transform(texts)
    except ValueError:  # no word at all (numbers only): names are just the index
        return [[] for _ in range(k)]
    weights = np.stack([np.asarray(x[labels == i].mean(axis=0)).ravel() for i in range(k)])
    return distinctive_terms(weights, list(vec.get_feature_names_out()), _NAME_TERMS)


# --------------------------------------------------------------------------- held-out hashes


def heldout_hashes(folder: str | Path) -> set[int]:
    """Hashes of the documents that prepared folder `folder` holds out (val/test), from its
    `<domain>/heldout_hashes.npy`."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    found: set[int] = set()
    for name, info in manifest.domains.items():
        path = domain_path(folder, info) / HELDOUT_HASHES
        if not path.is_file():
            raise DDKError(
                f"prepare.exclude_heldout: '{folder}' (domain '{name}') has no {HELDOUT_HASHES}; "
                "prepare it again with this ddk version"
            )
        found.update(read_array(folder, path, HASH_DTYPE).tolist())
    return found


# --------------------------------------------------------------------------- the plan


class DomainPlan:
    """What prepare asks of this module: `documents(tmp)` (the relabelled stream for the
    tokeniser; writes assignments.jsonl) and then `finish(tmp)` (clusters.json; returns the
    manifest's `auto_domains` entry)."""

    def __init__(self, cfg: PrepareSection, corpus: Corpus, embed_model: EmbedModel, progress):
        check_settings(cfg)
        self.cfg = cfg
        self.corpus = corpus
        self.progress = progress
        self.clustering = cfg.auto_domains is not None or cfg.split_domains is not None
        self.excluded = 0
        self.exclude = heldout_hashes(cfg.exclude_heldout) if cfg.exclude_heldout else set()
        self.models: dict[str | None, GroupModel] = {}
        self.counts: dict[str, list[int]] = {}  # name -> [documents, bytes]
        self.max_held = 0  # most documents held at once in pass 2 (a test checks the bound)
        if self.clustering:
            self._fit(embed_model)

    def log(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)

    def _stream(self) -> Iterator[tuple]:
        """(label, text, source, record) per kept document and (label, None, bytes, None) when
        a file ends; labels are not read when auto_domains ignores them."""
        domain_field = None if self.cfg.auto_domains is not None else self.cfg.domain_field
        files = self.corpus.files
        file_index, record = 0, 0
        seen = iter_documents(self.corpus, self.cfg.text_field, domain_field)
        for label, text, done in seen:
            if text is None:
                yield label, None, done, None
                file_index, record = file_index + 1, 0
                continue
            record += 1
            if not text.strip():
                continue
            if self.exclude and text_hash(text) in self.exclude:
                self.excluded += 1
                continue
            if self.corpus.layout == "hf_dataset" or file_index >= len(files):
                source = str(self.corpus.dataset_path)
            else:
                source = str(files[file_index].path)
            yield label, text, source, record - 1

    def _fit(self, embed_model: EmbedModel) -> None:
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed)
        samples: dict[str | None, list[str]] = {}
        seen: dict[str | None, int] = {}
        total = sum(f.size for f in self.corpus.files) or None
        bar = tqdm(
            desc="auto-domains: sampling",
            total=total,
            unit="B",
            unit_scale=True,
            dynamic_ncols=True,
            # `disable=False` would override TQDM_DISABLE: pass it only to switch the bar off.
            **({} if self.progress else {"disable": True}),
        )
        split = cfg.split_domains is not None
        for label, text, done, _ in self._stream():
            if text is None:
                bar.update(done)
                continue
            group = label if split else None
            sample = samples.setdefault(group, [])
            reservoir_add(sample, seen.get(group, 0), text, cfg.cluster_sample, rng)
            seen[group] = seen.get(group, 0) + 1
        bar.close()
        if not samples:
            raise DDKError(f"input '{cfg.input}' holds no non-empty documents")
        for group, texts in samples.items():
            if not split:
                model = fit_group(texts, cfg.auto_domains, cfg, embed_model, "", self.log)
            else:
                k = min(cfg.split_domains, len(set(texts)) // MIN_CLUSTER_DOCS)
                if k < 2:
                    self.log(f"split-domains: '{group}' has too few documents to split; kept whole")
                    continue
                model = fit_group(texts, k, cfg, embed_model, group, self.log)
            self.models[group] = model
            self.log(
                f"auto-domains: {group + ' -> ' if group else ''}{len(model.names)} domains "
                f"fitted on {len(texts):,} sampled documents ({cfg.embedder} features): "
                + ", ".join(model.names)
            )

    def documents(self, tmp: Path) -> Iterator[tuple]:
        """The stream `prepare` tokenises: (domain, text, 0) and (domain, None, bytes)."""
        self.excluded = 0  # pass 1 counted them too
        if not self.clustering:
            for label, text, extra, _ in self._stream():
                yield (label, None, extra) if text is None else (label, text, 0)
            return
        with open(tmp / ASSIGNMENTS, "w", encoding="utf-8") as out:
            batch: list[tuple] = []
            for item in self._stream():
                if item[1] is None:
                    yield from self._assign(batch, out)
                    batch = []
                    yield item[0], None, item[2]
                    continue
                batch.append(item)
                self.max_held = max(self.max_held, len(batch))
                if len(batch) >= ASSIGN_BATCH:
                    yield from self._assign(batch, out)
                    batch = []
            yield from self._assign(batch, out)

    def _assign(self, batch: list[tuple], out) -> Iterator[tuple]:
        names: list[str | None] = [None] * len(batch)
        groups: dict[str | None, list[int]] = {}
        split = self.cfg.split_domains is not None
        for i, (label, *_rest) in enumerate(batch):
            groups.setdefault(label if split else None, []).append(i)
        for group, idx in groups.items():
            model = self.models.get(group)
            if model is None:  # a labelled domain too small to split (or unseen in the sample)
                for i in idx:
                    names[i] = group
                continue
            for i, name in zip(idx, model.assign([batch[i][1] for i in idx])):
                names[i] = name
        for (_, text, source, record), name in zip(batch, names):
            count = self.counts.setdefault(name, [0, 0])
            count[0] += 1
            count[1] += len(text.encode("utf-8"))
            out.write(json.dumps({"source": source, "record": record, "domain": name}) + "\n")
            yield name, text, 0

    def finish(self, tmp: Path) -> dict:
        entry = {"excluded_heldout_documents": self.excluded}
        if self.cfg.exclude_heldout:
            entry["exclude_heldout"] = str(Path(self.cfg.exclude_heldout).expanduser().resolve())
            self.log(
                f"excluded {self.excluded:,} document(s) held out by {self.cfg.exclude_heldout}"
            )
        if not self.clustering:
            return entry
        clusters = {}
        for group, model in self.models.items():
            for i, name in enumerate(model.names):
                docs, nbytes = self.counts.get(name, [0, 0])
                clusters[name] = {
                    "from_domain": group,
                    "documents": docs,
                    "bytes": nbytes,
                    "sampled_documents": model.sample_sizes[i],
                    "top_terms": model.terms[i],
                    "named_by": model.basis[i],
                    "examples": model.examples[i],
                }
        for name, (docs, nbytes) in self.counts.items():  # domains kept whole
            clusters.setdefault(name, {"from_domain": name, "documents": docs, "bytes": nbytes})
        report = {
            "mode": "split_domains" if self.cfg.split_domains is not None else "auto_domains",
            "requested": self.cfg.split_domains or self.cfg.auto_domains,
            "embedder": self.cfg.embedder,
            "seed": self.cfg.seed,
            "cluster_sample": self.cfg.cluster_sample,
            "auto": {(g or "all"): m.auto for g, m in self.models.items() if m.auto},
            "clusters": clusters,
        }
        (tmp / CLUSTERS).write_text(json.dumps(report, indent=2, ensure_ascii=False))
        entry.update(
            mode=report["mode"],
            embedder=self.cfg.embedder,
            clusters=CLUSTERS,
            assignments=ASSIGNMENTS,
        )
        return entry


def plan(
    cfg: PrepareSection,
    corpus: Corpus,
    tokenizer_name: str,
    progress: bool,
    trust_remote_code: bool,
):
    """A DomainPlan when clustering or held-out exclusion is asked for, else None."""
    if not active(cfg):
        return None
    return DomainPlan(
        cfg, corpus, EmbedModel(cfg.embed_model or tokenizer_name, trust_remote_code), progress
    )
