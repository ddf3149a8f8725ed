"""The offline teacher: a `ddk cache-teacher` cache (top-k head, sampled tail; or a teacher
with another tokenizer's top-k rows, format 3) read back, so training loads no teacher model at
all; and the preflight check that a cache can serve a run."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ddk import identity
from ddk.data.split import HELDOUT_WINDOWS
from ddk.data.vocab import vocab_hash
from ddk.errors import DDKError
from ddk.identity import Strength
from ddk.losses.crosstok_sparse import shared_index
from ddk.models import load_tokenizer
from ddk.ranks import print0
from ddk.teacher.cache_format import (
    CHECKSUMS_KEY,
    CONTENT_KEY,
    CROSS_FORMAT,
    TOPK_FORMATS,
    cache_samples,
    is_cross,
    open_shard,
    read_cache_manifest,
    read_shared,
    shard_problem,
    shared_problem,
)
from ddk.teacher.perplexity import SharedPerplexities, hash_memo
from ddk.teacher.sampling import sample_log_weights
from ddk.teacher.signals import Batch, SparseCrossSignal, SparseSignal

# What each array of a shard's layout becomes in a signal (`cache_format._layout` order): ids,
# log-probs, log tail, then sample ids, their log-probs, log normaliser; or (format 3) log
# shared mass and alignment mode.
_TOPK_KINDS = (np.int64, np.float32, np.float32, np.int64, np.float32, np.float32)
_CROSS_KINDS = (np.int64, np.float32, np.float32, np.float32, np.int8)


class OfflineTeacher:
    """A `TeacherSource` that reads the cache: sparse signals, and the perplexities the cache
    recorded (or, for a cache without them, computed through `fallback`).

    ``estimator`` "sampled" hands the loss the tail samples too, "topk" only the top-k and the
    tail mass; None: whatever the cache holds."""

    MAX_OPEN = 128  # shard memmaps kept open (each holds a file descriptor)

    def __init__(
        self,
        folder: str | Path,
        domains: list[str],
        device: torch.device,
        estimator: str | None = None,
        fallback: Callable[[], SharedPerplexities] | None = None,
    ):
        self.folder = Path(folder).expanduser()
        self.manifest = read_cache_manifest(self.folder)
        self.domains = list(domains)
        self.device = device
        self.k = int(self.manifest["k"])
        self.tau = float(self.manifest["tau"])
        self.samples = cache_samples(self.manifest)
        self.cross = is_cross(self.manifest)  # top-k only: the estimator does not apply
        if self.cross:
            s_ids, t_ids = (torch.from_numpy(a) for a in read_shared(self.folder, self.manifest))
            self.student_shared = s_ids.to(device)
            self.shared_index = shared_index(t_ids, self.manifest["teacher_vocab_size"]).to(device)
        elif estimator == "sampled" and not self.samples:
            raise DDKError(
                f"teacher cache '{self.folder}' holds no tail samples; rebuild it with "
                "`ddk cache-teacher` or set teacher.sparse_estimator=topk"
            )
        self.sampled = bool(self.samples) and estimator != "topk"
        self._fallback_factory = fallback
        self.fallback: SharedPerplexities | None = None
        self._maps: collections.OrderedDict = collections.OrderedDict()
        self._verified: set[tuple[str, int]] = set()
        self.ppl_source: dict[str, str] = {}

    @property
    def ppl_key(self) -> dict:
        if self.fallback is not None and set(self.ppl_source.values()) != {"teacher cache"}:
            return self.fallback.key
        m = self.manifest
        built = cache_teachers(m)
        if len({t for t in built.values()}) == 1:
            return {
                "data": m.get("data_fingerprint"),
                "teacher": m.get("teacher_fingerprint"),
                "teacher_cache": str(self.folder),
            }
        return {
            "data": m.get("data_fingerprint"),
            "teacher": {d: built[d][1] for d in self.domains},
            "teachers": {d: built[d][0] for d in self.domains},
            "teacher_cache": str(self.folder),
        }

    def _shard(self, name: str, shard: int):
        key = (name, shard)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        if key not in self._verified:  # once per shard and process: a changed shard (random
            # bytes, edited log-probs) would index out of range or train on p > 1
            problem = shard_problem(self.folder, self.manifest, name, shard)
            if problem:
                raise DDKError(f"{problem}; rerun `ddk cache-teacher` to rebuild it")
            self._verified.add(key)
        arrays = open_shard(self.folder, self.manifest, name, shard)
        self._maps[key] = arrays
        if len(self._maps) > self.MAX_OPEN:
            self._maps.popitem(last=False)
        return arrays

    def signal(self, batch: Batch) -> SparseSignal | SparseCrossSignal:
        per = self.manifest["shard_sequences"]
        L = batch.input_ids.shape[1]
        if L != self.manifest["seq_len"]:
            raise DDKError(f"teacher cache has {self.manifest['seq_len']} tokens per row, not {L}")
        pairs = np.asarray(batch.rows).tolist()
        shards = [self._shard(self.domains[d], i // per) for d, i in pairs]

        kinds = _CROSS_KINDS if self.cross else _TOPK_KINDS

        def stacked(j: int) -> torch.Tensor:  # array j of the shard layout, rows of the batch
            arr = np.stack([arrays[j][i % per] for arrays, (_, i) in zip(shards, pairs)])
            arr = arr.astype(kinds[j], copy=False)
            return torch.from_numpy(arr.reshape(-1, *arr.shape[2:])).to(self.device)

        if self.cross:
            rows = (stacked(j) for j in range(5))
            return SparseCrossSignal(*rows, self.student_shared, self.shared_index)
        ids, logp, log_tail, *tail = (stacked(j) for j in range(6 if self.sampled else 3))
        if not tail:
            return SparseSignal(ids, logp, log_tail)
        sample_ids, sample_logp, log_norm = tail
        power = float(self.manifest["proposal_power"])
        logw = sample_log_weights(sample_logp, log_norm, self.samples, power)
        return SparseSignal(ids, logp, log_tail, sample_ids, sample_logp, logw)

    def perplexities(self, split: str = "val") -> dict[str, float] | None:
        ppl = self.manifest.get("teacher_ppl", {}).get(split)
        if self.manifest.get("teacher_ppl_windows") != HELDOUT_WINDOWS:
            ppl = None  # measured on windows cut another way: computed anew
        if ppl is None:
            if self._fallback_factory is None:
                return None
            if self.fallback is None:  # built on demand: it fingerprints the teacher's files
                self.fallback = self._fallback_factory()
            result = self.fallback.perplexities(split)
            self.ppl_source[split] = self.fallback.ppl_source.get(split, "computed")
            return result
        self.ppl_source[split] = "teacher cache"
        return {d: ppl[d] for d in self.domains}


def cache_problems(cfg, prepared_manifest, domains: list[str]) -> list[str]:
    """Preflight for `teacher.mode: offline`: every reason the cache cannot serve this run."""
    if not cfg.teacher.cache:
        return ["teacher.cache: required with teacher.mode offline (a `ddk cache-teacher` folder)"]
    try:
        m = read_cache_manifest(cfg.teacher.cache)
    except DDKError as e:
        return [f"teacher.cache: {e}"]
    where = f"teacher.cache: '{cfg.teacher.cache}'"
    cross = cfg.teacher.tokenizer == "cross"
    if m.get("format_version") in (*TOPK_FORMATS, CROSS_FORMAT) and is_cross(m) != cross:
        built, wanted = ("another", "same") if is_cross(m) else ("the student's", "cross")
        return [
            f"{where} was built for a teacher with {built} tokenizer, but teacher.tokenizer is "
            f"'{wanted}'; build a cache with this teacher.tokenizer (or point at the right one)"
        ]
    if m.get("format_version") not in ((CROSS_FORMAT,) if cross else TOPK_FORMATS):
        return [f"{where} has cache format {m.get('format_version')}; build it again"]
    if cross:
        return _cross_problems(cfg, m, where, prepared_manifest, domains)
    if cfg.teacher.sparse_estimator == "sampled" and not cache_samples(m):
        return [
            f"{where} holds no tail samples (top-k only: built with sparse_estimator topk or by "
            "an older ddk); rebuild it with `ddk cache-teacher` or set "
            "teacher.sparse_estimator=topk"
        ]
    problems = _common_problems(cfg, m, where, prepared_manifest, domains)
    if m.get("complete") and CHECKSUMS_KEY not in m:
        print0(
            f"warning: {where} was written before ddk recorded shard checksums: each shard's "
            "values are checked when first read, not its exact bytes; rerun `ddk "
            "cache-teacher` with this config to check every shard and record its checksum"
        )
    if cfg.teacher.sparse_estimator == "sampled" and cache_samples(m) != cfg.teacher.cache_samples:
        print0(
            f"warning: {where} holds {cache_samples(m)} tail samples per token, not "
            f"teacher.cache_samples={cfg.teacher.cache_samples}; distilling with "
            f"{cache_samples(m)}"
        )
    return problems


def _common_problems(cfg, m: dict, where: str, prepared_manifest, domains: list[str]) -> list:
    """What every cache must match: finished, the run's tau, data and teacher."""
    problems = []
    if int(m["k"]) != cfg.teacher.cache_k:  # k only sets how a cache is built: say which one
        print0(
            f"warning: {where} holds the teacher's top-{m['k']}, not teacher.cache_k="
            f"{cfg.teacher.cache_k}; distilling with k = {m['k']}"
        )
    if not m.get("complete"):
        problems.append(f"{where} is incomplete; finish it with `ddk cache-teacher`")
    if float(m["tau"]) != float(cfg.distill.tau):
        problems.append(
            f"{where} was built at tau {m['tau']} but distill.tau is {cfg.distill.tau}; use the "
            "same tau or build a cache for it"
        )
    if prepared_manifest is not None:
        problems += _data_problems(cfg, m, where, prepared_manifest, domains)
    if cfg.model.teacher:
        problems += _teacher_problems(cfg, m, where, domains)
    return problems


def _cross_problems(cfg, m: dict, where: str, prepared_manifest, domains: list[str]) -> list:
    """A cache of a teacher with another tokenizer (format 3): as any cache, plus its shared
    strings' file, the teacher's own tokenizer (when it is on this machine) and the
    perplexities DDK steers by."""
    problems = _common_problems(cfg, m, where, prepared_manifest, domains)
    shared = shared_problem(Path(cfg.teacher.cache).expanduser(), m)
    if shared:
        problems.append(f"{shared}; rerun `ddk cache-teacher` to rebuild it")
    if cfg.model.teacher and identity.teacher_on_disk(cfg.model.teacher):
        try:
            tokenizer = load_tokenizer(cfg.model.teacher, cfg.model.trust_remote_code)
        except DDKError:  # no tokenizer there: preflight warns of it
            tokenizer = None
        if tokenizer is not None and vocab_hash(tokenizer) != m.get("teacher_vocab_sha256"):
            problems.append(
                f"{where} was built for another teacher tokenizer than model.teacher's "
                f"('{cfg.model.teacher}'); run `ddk cache-teacher` with this teacher"
            )
    if m.get("complete") and m.get("teacher_ppl_windows") != HELDOUT_WINDOWS:
        problems.append(f"{where} holds teacher perplexities of older held-out windows; "
                        "run `ddk cache-teacher` into a new folder")  # fmt: skip
    return problems


def _data_problems(cfg, m: dict, where: str, prepared_manifest, domains: list[str]) -> list[str]:
    tokenizer = prepared_manifest.tokenizer
    other = f"{where} was built from other prepared data than '{cfg.data.prepared}'"
    problems = []
    if m["vocab_size"] != tokenizer.vocab_size or m.get("vocab_sha256") != tokenizer.vocab_sha256:
        problems.append(f"{where} was built for another vocabulary than data.prepared's")
    elif m["data_fingerprint"] != identity.record_fingerprint(prepared_manifest):
        problems.append(f"{other}; run `ddk cache-teacher` on this data")
    elif CONTENT_KEY in m and m[CONTENT_KEY] != identity.data_fingerprint(
        cfg.data.prepared, Strength.CONTENT, memo=hash_memo(cfg)
    ):  # the tokens themselves: a shard edited in place is other data
        problems.append(f"{other} (its token files changed); run `ddk cache-teacher` again")
    absent = [d for d in domains if d not in m["domains"]]
    if absent:
        problems.append(f"{where} has no domain '{absent[0]}'; cache it or drop it from the run")
    return problems


def cache_teachers(m: dict) -> dict[str, tuple[str | None, str | None]]:
    """{domain: (teacher, its fingerprint)} a cache was built from: each domain's own where
    it was built with `model.teachers`, else the manifest's one teacher."""
    one = (m.get("teacher"), m.get("teacher_fingerprint"))
    return {
        d: (info["teacher"], info["teacher_fingerprint"]) if "teacher" in info else one
        for d, info in m["domains"].items()
    }


def _teacher_problems(cfg, m: dict, where: str, domains: list[str]) -> list[str]:
    built = cache_teachers(m)
    several = len({fp for _, fp in built.values()}) > 1 or len(cfg.model.teachers) > 0
    fingerprints: dict[str, str] = {}
    for d in (d for d in domains if d in built):
        name, fingerprint = built[d]
        wanted = cfg.model.teacher_of(d)
        if not several:
            other = f"{where} was built by another teacher ('{name}') than model.teacher '{wanted}'"
        else:
            other = (
                f"{where} was built for another teacher mapping: domain '{d}' from '{name}', "
                f"not '{wanted}'; run `ddk cache-teacher` with this model.teachers"
            )
        if not identity.teacher_on_disk(wanted):
            # Training off the teacher's machine: only the name it was cached under can be compared.
            if name != wanted:
                return [other]
            continue
        if wanted not in fingerprints:
            try:
                fingerprints[wanted] = identity.teacher_fingerprint(wanted, hash_memo(cfg))
            except DDKError as e:
                return [f"model.teacher: {e}"]
        if fingerprints[wanted] != fingerprint:
            return [other]
    return []
