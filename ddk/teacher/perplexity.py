"""Teacher perplexities, computed once per (data, teacher) and shared by every run, and the
run folder's record of them (`teacher_ppl.json`).

The teacher is frozen, so its per-domain perplexity on a split depends only on the held-out
tokens, the teacher's weights and the dtype it runs in: the cache key is the data's CONTENT
fingerprint over the held-out splits and the teacher's fingerprint with its dtype
(`ddk.identity`). Entries live under `teacher.ppl_cache_dir` (default $XDG_CACHE_HOME or
~/.cache, then ddk/teacher_ppl), outside the data folder, so read-only data works and cpt, kd,
ddk, ... on the same data reuse one evaluation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ddk import identity
from ddk.data.split import HELDOUT_WINDOWS
from ddk.evaluate import run_perplexities
from ddk.fileutil import write_json_atomic
from ddk.identity import FileHashMemo, Strength
from ddk.models import check_vocab, embedding_rows, resolve_dtype
from ddk.teacher.placement import load_configured_teacher

DEFAULT_DIR = "ddk/teacher_ppl"  # under $XDG_CACHE_HOME, else ~/.cache
HELDOUT = ("val", "test")
RECORD = "teacher_ppl.json"


def cache_dir(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(root).expanduser() / DEFAULT_DIR


def hash_memo(cfg) -> FileHashMemo:
    """The per-user memo of file hashes, kept beside the teacher perplexity cache."""
    return FileHashMemo(cache_dir(cfg.teacher.ppl_cache_dir) / identity.MEMO_FILE)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class TeacherPPLCache:
    """{split: {domain: {"ppl", "loss", "tokens"}}} for one (data, teacher) pair."""

    def __init__(self, store: Path, data_fp: str, teacher_fp: str | None):
        self.store = store
        # the windowing rule too: data prepared by an older ddk is now scored another way
        self.key = {"data": data_fp, "teacher": teacher_fp, "windows": HELDOUT_WINDOWS}
        self.path = None if teacher_fp is None else store / f"{data_fp[:16]}-{teacher_fp[:16]}.json"

    def _entries(self) -> dict:
        if self.path is None:
            return {}
        cached = _read_json(self.path)
        return cached.get("splits", {}) if cached.get("key") == self.key else {}

    def get(self, split: str, domains: list[str]) -> dict | None:
        found = self._entries().get(split, {})
        if all(d in found for d in domains):
            return {d: found[d] for d in domains}
        return None

    def put(self, split: str, result: dict) -> None:
        if self.path is None:
            return
        splits = self._entries()  # merge: another run may have added a split meanwhile
        splits.setdefault(split, {}).update(result)
        try:
            write_json_atomic(self.path, {"key": self.key, "splits": splits})
        except OSError as e:
            print(f"warning: cannot write the teacher perplexity cache '{self.path}': {e}")


class SharedPerplexities:
    """{domain: ppl} per split of the run's teacher: from the shared cache, else computed with
    `model`, or, when the run trains without the teacher (cpt), with the teacher loaded for
    this alone and freed after. The run's `splits` are computed together on first use, so a
    teacher loaded only for them is loaded once. `teacher` (default `model.teacher`) and
    `domains` (default all the run's): with `model.teachers`, one per teacher, over the domains
    it serves."""

    def __init__(
        self,
        cfg,
        data,
        runtime,
        *,
        model=None,
        student_rows: int,
        splits,
        teacher=None,
        domains=None,
    ):
        self.cfg, self.data, self.runtime, self.model = cfg, data, runtime, model
        self.teacher = teacher or cfg.model.teacher
        self.domains = list(domains) if domains is not None else list(data.names)
        self.student_rows = student_rows
        self.splits = tuple(dict.fromkeys(splits))
        store = cache_dir(cfg.teacher.ppl_cache_dir)
        self.dtype = resolve_dtype(cfg.model.dtype, runtime.device)
        data_fp = identity.data_fingerprint(
            data.folder, Strength.CONTENT, splits=HELDOUT, memo=hash_memo(cfg)
        )
        teacher_fp = identity.evaluated_teacher_fingerprint(self.teacher, str(self.dtype), store)
        self.cache = TeacherPPLCache(store, data_fp, teacher_fp)
        self.ppl_source: dict[str, str] = {}
        self._ppl: dict[str, dict[str, float]] = {}

    @property
    def key(self) -> dict:
        return {**self.cache.key, "teacher_cache": None}

    def perplexities(self, split: str) -> dict[str, float]:
        if split not in self._ppl:
            self._compute([s for s in (*self.splits, split) if s not in self._ppl])
        return self._ppl[split]

    def _compute(self, splits: list[str]) -> None:
        domains, rt, model = self.domains, self.runtime, self.model
        for split in dict.fromkeys(splits):
            # rank 0's view of the cache decides for every rank: evaluation all-reduces
            result = rt.broadcast_object(self.cache.get(split, domains))
            self.ppl_source[split] = "cache"
            if result is None:
                if model is None:  # placed as training would place it (a 70B teacher: sharded)
                    model = self._load_teacher()
                result = run_perplexities(self.cfg, model, self.data, split, rt, domains=domains)
                self.ppl_source[split] = "computed"
                if rt.is_main:
                    self.cache.put(split, result)
            self._ppl[split] = {d: result[d]["ppl"] for d in domains}
        if model is not self.model:
            del model  # cpt: the teacher was needed for these perplexities only
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _load_teacher(self):
        cfg = self.cfg
        model = load_configured_teacher(cfg, self.runtime, self.teacher)
        check_vocab(self.data.vocab_size, embedding_rows(model), self.student_rows)
        return model


def write_teacher_ppl(run_dir: Path, key: dict, source: dict, ppl: dict,
                      ppl_byte: dict | None = None) -> None:  # fmt: skip
    """`RUN/teacher_ppl.json`, the one writer: the run's teacher perplexities per split
    (`ppl`), where each came from (`source`: "cache", "computed" or "teacher cache") and what
    identifies the data and teacher they belong to (`key`: data, teacher, teacher_cache);
    teachers that read text (cross-tokenizer) add them per UTF-8 byte (`ppl_byte`)."""
    record = {"key": key, "source": source, "ppl": ppl}
    if ppl_byte is not None:
        record["ppl_byte"] = ppl_byte
    write_json_atomic(Path(run_dir) / RECORD, record)


def per_byte_perplexities(teacher, splits) -> dict[str, dict[str, float]] | None:
    """{split: {domain: teacher ppl per byte}} of a teacher that reads text (its `details`),
    else None."""
    details = getattr(teacher, "details", None)
    found = {s: details(s) for s in splits} if details is not None else {}
    if not found or any(v is None for v in found.values()):
        return None
    return {s: {d: r["ppl_byte"] for d, r in v.items()} for s, v in found.items()}
