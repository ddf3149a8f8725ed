"""Teacher perplexities, computed once per (data, teacher) and shared by every run.

The teacher is frozen, so its per-domain perplexity on a split depends only on the prepared
data, the teacher's weights and the dtype it runs in. The cache key is (data fingerprint =
SHA-256 of the manifest, teacher fingerprint = SHA-256 of its config and weight files + dtype).
Entries live under `teacher.ppl_cache_dir` (default $XDG_CACHE_HOME or ~/.cache, then
ddk/teacher_ppl), outside the data
folder, so read-only data works and cpt, kd, ddk, ... on the same data reuse one evaluation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from ddk.data.split import HELDOUT_WINDOWS
from ddk.fileutil import sha256_file, write_json_atomic

DEFAULT_DIR = "ddk/teacher_ppl"  # under $XDG_CACHE_HOME, else ~/.cache
_HASHES = "file_sha256.json"  # memo of weight-file hashes by (path, size, mtime)


def cache_dir(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(root).expanduser() / DEFAULT_DIR


def data_fingerprint(folder: str | Path) -> str:
    """The manifest names every shard's size and source hashes: a new prepare changes it."""
    return sha256_file(Path(folder).expanduser() / "manifest.json")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _file_hash(path: Path, memo: dict) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key not in memo:
        memo[key] = sha256_file(path)
    return memo[key]


def teacher_fingerprint(name: str, dtype: str, store: Path) -> str | None:
    """The teacher's files (`ddk.models.model_fingerprint`, weight hashes memoised in `store`)
    and the dtype it is evaluated in; None when the files cannot be found (the perplexities are
    then computed for this run only)."""
    from ddk.models import local_model_folder, model_fingerprint

    folder = local_model_folder(name, "teacher")
    if folder is None or not (folder / "config.json").is_file():
        return None
    memo_path = store / _HASHES
    memo = _read_json(memo_path)
    files = model_fingerprint(folder, lambda p: _file_hash(p, memo))
    if files is None:
        return None
    with contextlib.suppress(OSError):  # an unwritable cache only costs re-hashing next time
        write_json_atomic(memo_path, memo)
    return hashlib.sha256(f"dtype={dtype}\n{files}".encode()).hexdigest()


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


def teacher_perplexities(
    cfg,
    data,
    domains: list[str],
    splits: tuple[str, ...],
    *,
    runtime,
    teacher_model,
    student_rows: int,
    run_dir: Path,
) -> dict[str, dict[str, float]] | None:
    """{split: {domain: ppl}} of the run's teacher; None without one. Cached entries are
    reused; missing ones are computed with `teacher_model`, or, when the method trains without
    a teacher (cpt), with the teacher loaded for this alone and freed after. The run folder gets
    `teacher_ppl.json` (values and whether each split came from the cache) for the report."""
    import torch

    from ddk.evaluate import run_perplexities
    from ddk.models import check_vocab, embedding_rows, resolve_dtype
    from ddk.teacher.placement import load_placed_teacher

    if not cfg.model.teacher:
        return None
    store = cache_dir(cfg.teacher.ppl_cache_dir)
    dtype = resolve_dtype(cfg.model.dtype, runtime.device)
    cache = TeacherPPLCache(
        store,
        data_fingerprint(data.folder),
        teacher_fingerprint(cfg.model.teacher, str(dtype), store),
    )
    out, source, model = {}, {}, teacher_model
    for split in dict.fromkeys(splits):
        # rank 0's view of the cache decides for every rank: evaluation all-reduces
        result = runtime.broadcast_object(cache.get(split, domains))
        source[split] = "cache"
        if result is None:
            if model is None:  # placed as training would place it (a 70B teacher: sharded)
                model = load_placed_teacher(
                    cfg.model.teacher,
                    dtype=dtype,
                    trust_remote_code=cfg.model.trust_remote_code,
                    requested=cfg.teacher.placement,
                    runtime=runtime,
                )
                check_vocab(data.vocab_size, embedding_rows(model), student_rows)
            result = run_perplexities(cfg, model, data, split, runtime.autocast)
            source[split] = "computed"
            if runtime.is_main:
                cache.put(split, result)
        out[split] = {d: result[d]["ppl"] for d in domains}
    if model is not teacher_model:
        del model  # cpt: the teacher was needed for these perplexities only
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if runtime.is_main:
        write_json_atomic(
            Path(run_dir) / "teacher_ppl.json", {"key": cache.key, "source": source, "ppl": out}
        )
    return out
