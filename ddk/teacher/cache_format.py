"""The on-disk format of a `ddk cache-teacher` cache (format 2): the teacher's top-k head plus
sampled tail tokens.

Layout of the cache folder (``teacher.cache``)::

    manifest.json                 what was cached, from which data and by which teacher
    <domain folder>/000000.bin    one shard: up to SHARD_SEQUENCES training sequences

A shard holds, for its n sequences of L = seq_len positions (position t predicts token t+1),
C-order arrays back to back (``_layout``): ids [n, L, k] (uint16, or uint32 past 65,536
tokens), log-probs at temperature tau [n, L, k] (float16) and the log tail mass [n, L]
(float32); with s = ``samples`` > 0 (``teacher.sparse_estimator: sampled``) then s tail ids
drawn from the teacher [n, L, s], their log-probs [n, L, s] and the tail proposal's log
normaliser [n, L] (float32; ``ddk.teacher.sampling``): (k + s)·(2 + id bytes) + 4 (+ 4 with
samples) bytes per token. The draws' uniforms are a hash of (data fingerprint, domain,
sequence, position) (``position_uniforms``). Format 1 (before samples) is format 2 with s = 0:
the top-k estimator still reads it. Each shard is written to a temporary file and renamed,
so a shard either exists whole or not at all.

Format 3 is a teacher with ANOTHER tokenizer (`teacher.tokenizer: cross`): per student position
(the same rows as above) the teacher's top-k ids in ITS vocabulary [n, L, k] (uint16 or uint32
by the teacher's vocabulary) and log-probs at tau [n, L, k] (float16), the log tail mass
[n, L], the log mass on the token strings both vocabularies share [n, L] (float32) and the
alignment mode [n, L] (int8: 0 none, 1 exact, 2 other; `ddk.losses.crosstok_sparse`):
k·(2 + id bytes) + 9 bytes per token. `shared.npy` beside the manifest holds the shared strings'
ids [2, M] (int64; row 0 the student's, row 1 the teacher's), its SHA-256 in the manifest.

The manifest's identity (`IDENTITY_KEYS`) says which teacher, data, k, tau and sampling a cache
holds;
`data_content_fingerprint` (added without a format change: caches without it are matched on
the rest) ties it to the data's tokens themselves (`ddk.identity`). `shard_sha256` (also
added without a format change) records each shard's SHA-256 when the cache is finished: a
reader checks each shard once, and a rerun of `ddk cache-teacher` rebuilds any shard that is
missing, truncated or changed. A cache written before checksums has its shards' values checked
instead (`shard_values_problem`), and a rerun of `ddk cache-teacher` rebuilds those that fail
and records the checksums.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from ddk.errors import DDKError
from ddk.fileutil import disk_full, sha256_file
from ddk.lock import LOCK_NAME
from ddk.teacher.sampling import counter_uniforms
from ddk.teacher.signals import SparseSignal

FORMAT_VERSION = 2
TOPK_FORMATS = (1, 2)  # format 1 is format 2 without tail samples
CROSS_FORMAT = 3  # a teacher with another tokenizer (module doc)
SHARED_FILE = "shared.npy"
SHARED_KEY = "shared_sha256"
MANIFEST = "manifest.json"
SHARD_SEQUENCES = 64  # (choice) ~50 MB per shard at seq_len 2048, k = 64, a 150k vocabulary
LOGP_DTYPE = np.dtype(np.float16)
TAIL_DTYPE = np.dtype(np.float32)
MODE_DTYPE = np.dtype(np.int8)
IDENTITY_KEYS = (
    "format_version",
    "teacher_fingerprint",
    "data_fingerprint",
    "k",
    "tau",
    "samples",
    "proposal_power",
    "domains",
    "teacher_vocab_sha256",  # format 3: the teacher's own vocabulary (absent before: None)
)
CONTENT_KEY = "data_content_fingerprint"
CHECKSUMS_KEY = "shard_sha256"  # {domain: [sha256 of shard 0, 1, ...]}


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def bytes_per_token(k: int, vocab_size: int, samples: int = 0, cross: bool = False) -> int:
    """k ids and log-probs plus the log tail mass; with m tail samples, m more ids and log-probs
    plus the tail proposal's log normaliser; `cross` (format 3, `vocab_size` the teacher's):
    plus the log shared mass and the alignment mode."""
    entry = id_dtype(vocab_size).itemsize + LOGP_DTYPE.itemsize
    if cross:
        return k * entry + 2 * TAIL_DTYPE.itemsize + MODE_DTYPE.itemsize
    return (k + samples) * entry + TAIL_DTYPE.itemsize * (2 if samples else 1)


def is_cross(m: dict) -> bool:
    """Whether a cache manifest is of a teacher with another tokenizer (format 3)."""
    return m.get("format_version") == CROSS_FORMAT


def cache_samples(m: dict) -> int:
    """Tail samples per token of a cache manifest (0: top-k only, as every format-1 cache)."""
    return int(m.get("samples") or 0)


def _layout(m: dict, sequences: int) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of each array of a shard of ``sequences`` sequences, in file order."""
    L, k, s, dt = m["seq_len"], int(m["k"]), cache_samples(m), m["dtypes"]
    arrays = [("ids", (k,)), ("logp", (k,)), ("log_tail", ())]
    if is_cross(m):
        arrays += [("log_shared", ()), ("mode", ())]
    elif s:
        arrays += [("sample_ids", (s,)), ("sample_logp", (s,)), ("log_norm", ())]
    return [(name, np.dtype(dt[name]), (sequences, L, *tail)) for name, tail in arrays]


def _sample_key(data_fp: str, domain: str) -> int:
    """The seed of a domain's draws: a hash of the data fingerprint and the domain name."""
    return int.from_bytes(hashlib.sha256(f"{data_fp}/{domain}".encode()).digest()[:8], "little")


def position_uniforms(m: dict, domain: str, sequences: list[int]) -> np.ndarray:
    """[len(sequences) * L] uniforms of the tail draws: one per (sequence, position)."""
    L = m["seq_len"]
    counters = np.asarray(sequences, dtype=np.uint64)[:, None] * np.uint64(L) + np.arange(
        L, dtype=np.uint64
    )
    return counter_uniforms(_sample_key(m["data_fingerprint"], domain), counters.ravel())


def shard_path(folder: Path, info: dict, shard: int) -> Path:
    return folder / info["folder"] / f"{shard:06d}.bin"


def shard_sequences(m: dict, info: dict, shard: int) -> int:
    """Sequences in shard `shard` of a domain (`info`) of the cache with manifest `m`."""
    return min(m["shard_sequences"], info["sequences"] - shard * m["shard_sequences"])


def shard_bytes(m: dict, sequences: int) -> int:
    return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in _layout(m, sequences))


def shard_arrays(
    signal: SparseSignal, vocab_size: int, log_norm: torch.Tensor | None = None
) -> list[np.ndarray]:
    """A sparse signal as the shard's arrays in ``_layout`` order and the stored dtypes: (ids,
    log-probs, log tail), then for a sampled signal (sample ids, their log-probs, the proposal's
    log normaliser ``log_norm``; the weights are not stored: ``sample_log_weights``)."""
    arrays = list(signal[:3])
    if signal.sampled:
        arrays += [signal.sample_ids, signal.sample_logp, log_norm]
    dtypes = (id_dtype(vocab_size), LOGP_DTYPE, TAIL_DTYPE) * 2
    return [a.cpu().numpy().astype(d) for a, d in zip(arrays, dtypes)]


def cross_shard_arrays(rows, teacher_vocab: int) -> list[np.ndarray]:
    """Sparse cross-tokenizer rows (`ddk.losses.crosstok_sparse.SparseCrossRows`) as a format-3
    shard's arrays in ``_layout`` order and the stored dtypes."""
    dtypes = (id_dtype(teacher_vocab), LOGP_DTYPE, TAIL_DTYPE, TAIL_DTYPE, MODE_DTYPE)
    return [t.cpu().numpy().astype(d) for t, d in zip(rows, dtypes)]


def shared_bytes(student_ids: np.ndarray, teacher_ids: np.ndarray) -> bytes:
    """The bytes of `shared.npy` (format 3): the shared strings' ids as int64 [2, M]."""
    buffer = io.BytesIO()
    np.save(buffer, np.stack([student_ids, teacher_ids]).astype(np.int64), allow_pickle=False)
    return buffer.getvalue()


def write_shared(folder: Path, data: bytes) -> None:
    """Write `shared.npy` (`shared_bytes`) whole or not at all."""
    path = folder / SHARED_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_shared(folder: Path, m: dict) -> tuple[np.ndarray, np.ndarray]:
    """(student ids, teacher ids) of a format-3 cache's shared strings, checked against the
    manifest's checksum, or a one-line DDKError."""
    problem = shared_problem(folder, m)
    if problem:
        raise DDKError(f"{problem}; rerun `ddk cache-teacher` to rebuild it")
    pairs = np.load(folder / SHARED_FILE, allow_pickle=False)
    return pairs[0], pairs[1]


def shared_problem(folder: Path, m: dict) -> str:
    """Why a format-3 cache's `shared.npy` cannot be read ('' when it can, or no format 3)."""
    if not is_cross(m):
        return ""
    path = Path(folder) / SHARED_FILE
    if not path.is_file():
        return f"teacher cache file '{path}' is missing"
    if sha256_file(path) != m.get(SHARED_KEY):
        return f"teacher cache file '{path}' does not match its checksum (changed or corrupt)"
    return ""


def write_shard(path: Path, arrays: list[np.ndarray]) -> None:
    """Write one shard (its arrays back to back) to a temporary file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            for a in arrays:
                fh.write(np.ascontiguousarray(a).tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise DDKError(
                f"the disk is full writing teacher cache shard '{path}'; free space (or set "
                "teacher.cache elsewhere) and rerun `ddk cache-teacher`: it keeps the finished "
                "shards"
            ) from None
        raise


def shard_checksums(folder: Path, m: dict) -> dict[str, list[str]]:
    """Every shard's SHA-256 (reads the whole cache once: done when it is finished)."""
    return {
        name: [sha256_file(shard_path(folder, info, j)) for j in range(info["shards"])]
        for name, info in m["domains"].items()
    }


def shard_problem(folder: Path, m: dict, name: str, shard: int, checksum: bool = True) -> str:
    """Why shard `shard` of domain `name` cannot be read as the manifest `m` describes it
    ('' when it can): missing, of the wrong size, or (`checksum`) not the bytes recorded."""
    info = m["domains"][name]
    path = shard_path(folder, info, shard)
    if not path.is_file():
        return f"teacher cache shard '{path}' is missing"
    if path.stat().st_size != shard_bytes(m, shard_sequences(m, info, shard)):
        return f"teacher cache shard '{path}' is truncated or of the wrong size"
    recorded = m.get(CHECKSUMS_KEY, {}).get(name)
    if checksum and recorded is not None and sha256_file(path) != recorded[shard]:
        return f"teacher cache shard '{path}' does not match its checksum (changed or corrupt)"
    if checksum and recorded is None:  # a cache from before checksums: what can be checked
        return shard_values_problem(folder, m, name, shard)
    return ""


# (choice) top-k mass plus tail mass may miss 1 by float16 rounding of k log-probs, no more.
MASS_TOLERANCE = 0.02
LOGP_SLACK = 1e-3  # a log-probability above this is a probability above 1


def shard_values_problem(folder: Path, m: dict, name: str, shard: int) -> str:
    """Why a shard's values cannot be a teacher's distribution ('' when they can): ids outside
    the vocabulary, log-probs that are NaN or above 0, or a top-k head whose probabilities and
    tail mass do not sum to 1. The check for a shard with no recorded checksum (a cache written
    before checksums existed): it catches random bytes and edited log-probs, not a shard
    swapped for another valid one."""
    path = shard_path(folder, m["domains"][name], shard)
    vocab = m["teacher_vocab_size"] if is_cross(m) else m["vocab_size"]
    arrays = open_shard(folder, m, name, shard)
    for seq in range(arrays[0].shape[0]):  # one sequence at a time: bounded memory
        ids, logp, log_tail, *tail = (np.asarray(a[seq]) for a in arrays)
        logp, log_tail = logp.astype(np.float32), log_tail.astype(np.float32)
        problem = ""
        if is_cross(m):  # tail: the log shared mass and the alignment mode
            if ((tail[1] < 0) | (tail[1] > 2)).any():
                problem = "alignment modes other than 0, 1, 2"
            elif np.isnan(tail[0]).any() or (tail[0] > LOGP_SLACK).any():
                problem = "shared-string log masses that are NaN or above 0"
            tail = []
        problem = problem or _row_problem(ids, logp, log_tail, tail, vocab)
        if problem:
            return f"teacher cache shard '{path}' holds {problem} (sequence {seq})"
    return ""


def _row_problem(ids, logp, log_tail, tail: list, vocab: int) -> str:
    """`shard_values_problem` of one sequence's top-k head (and tail samples, if any)."""
    if int(ids.max(initial=0)) >= vocab or (tail and int(tail[0].max(initial=0)) >= vocab):
        return f"token ids beyond the vocabulary of {vocab}"
    if any(np.isnan(a).any() or (a > LOGP_SLACK).any() for a in (logp, log_tail)):
        return "log-probabilities that are NaN or above 0"
    if tail and (np.isnan(tail[1]).any() or (tail[1] > LOGP_SLACK).any()):
        return "tail sample log-probabilities that are NaN or above 0"
    if tail and not np.isfinite(tail[2]).all():
        return "tail proposal normalisers that are not finite"
    mass = np.exp(logp).sum(-1) + np.exp(log_tail)
    if np.abs(mass - 1).max() > MASS_TOLERANCE:
        return "top-k probabilities and tail mass that do not sum to 1"
    return ""


def open_shard(folder: Path, m: dict, name: str, shard: int) -> tuple[np.memmap, ...]:
    """The arrays of one shard in ``_layout`` order (ids [n, L, k], logp [n, L, k], log_tail
    [n, L], then with samples sample_ids, sample_logp [n, L, s] and log_norm [n, L]),
    memory-mapped."""
    info = m["domains"][name]
    n = shard_sequences(m, info, shard)
    path = shard_path(folder, info, shard)
    if not path.is_file() or path.stat().st_size != shard_bytes(m, n):
        raise DDKError(f"teacher cache shard '{path}' is missing or truncated; rebuild the cache")
    arrays, offset = [], 0
    for _, dtype, shape in _layout(m, n):
        arrays.append(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape))
        offset += math.prod(shape) * dtype.itemsize
    return tuple(arrays)


# The manifest's typed schema: key -> type (a dict: the keys of one domain's entry).
_SCHEMA = {
    "format_version": int,
    "teacher_fingerprint": str,
    "data_fingerprint": str,
    "vocab_size": int,
    "seq_len": int,
    "k": int,
    "tau": (int, float),
    "shard_sequences": int,
    "dtypes": {"ids": str, "logp": str, "log_tail": str},
    "bytes_per_token": int,
    "complete": bool,
}
_DOMAIN_SCHEMA = {"folder": str, "sequences": int, "shards": int}


def read_cache_manifest(folder: str | Path) -> dict:
    """The one reader of a cache's manifest: parsed, typed and its domain folders confined to
    the cache, or a one-line DDKError."""
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not path.is_file():
        raise DDKError(
            f"'{folder}' holds no teacher cache (no {MANIFEST}); run `ddk cache-teacher`"
        )
    # A rerun of cache-teacher reads this same manifest: the fix is a new cache.
    rebuild = (
        f"delete '{folder}' (or set teacher.cache to a new folder) and run `ddk cache-teacher`"
    )
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise DDKError(f"{path} is corrupt (not JSON); {rebuild}") from None
    # Prepared data also has a manifest.json: name the mix-up instead of a format mismatch.
    if not isinstance(m, dict) or "teacher_fingerprint" not in m:
        what = " (it is prepared data)" if isinstance(m, dict) and "format" in m else ""
        raise DDKError(
            f"'{folder}' is not a teacher cache{what}; point teacher.cache at a "
            "`ddk cache-teacher` folder"
        )
    problem = _schema_problem(m, _SCHEMA, "")
    domains = m.get("domains")
    if not problem and (not isinstance(domains, dict) or not domains):
        problem = "key 'domains' is missing or not a non-empty mapping"
    for name, info in (domains or {}).items() if not problem else ():
        problem = _schema_problem(info, _DOMAIN_SCHEMA, f"domains.{name}.") or _folder_problem(
            folder, name, info["folder"]
        )
        if problem:
            break
    if problem:
        raise DDKError(f"{path}: {problem}; {rebuild}")
    return m


def _schema_problem(value: object, schema: dict, prefix: str) -> str:
    if not isinstance(value, dict):
        return f"'{prefix.rstrip('.')}' is not a mapping"
    for key, kind in schema.items():
        if key not in value:
            return f"key '{prefix}{key}' is missing"
        if isinstance(kind, dict):
            problem = _schema_problem(value[key], kind, f"{prefix}{key}.")
            if problem:
                return problem
        elif not isinstance(value[key], kind) or (kind is int and isinstance(value[key], bool)):
            return f"key '{prefix}{key}' has the wrong type ({type(value[key]).__name__})"
    return ""


def _folder_problem(folder: Path, name: str, sub: str) -> str:
    """A domain's shards lie in a folder inside the cache, never elsewhere."""
    rel = Path(sub)
    if not sub or rel.is_absolute() or ".." in rel.parts:
        return f"domain '{name}' names folder '{sub}', which is not inside the cache"
    path = folder / rel
    if path.exists() and not path.resolve().is_relative_to(folder.resolve()):
        return f"domain '{name}' folder '{sub}' leads out of the cache"
    if path.exists() and not path.is_dir():
        return f"'{path}' (domain '{name}') is a file, not a shard folder"
    return ""


def cache_identity(folder: str | Path) -> str:
    """What a checkpoint pins of the cache it trained on: its identity and every shard's
    checksum (a cache rebuilt with the same settings has the same bytes, so it matches)."""
    m = read_cache_manifest(folder)
    keys = (*IDENTITY_KEYS, CONTENT_KEY, CHECKSUMS_KEY)
    pinned = {k: m.get(k) for k in keys}
    return hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()


def write_cache_manifest(folder: Path, m: dict) -> None:
    # A fixed temporary name, not fileutil.write_json_atomic's random one: `check_target`
    # recognises `manifest.json.tmp` as what a run killed mid-write leaves behind.
    path = folder / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(m, indent=2, sort_keys=True))
    os.replace(tmp, path)


def same_cache(old: dict, new: dict) -> bool:
    """Whether two manifests describe the same cache (the data's content is compared when
    both record it: caches written before it was recorded are matched on the rest)."""
    keys = IDENTITY_KEYS + ((CONTENT_KEY,) if CONTENT_KEY in old and CONTENT_KEY in new else ())
    return all(old.get(k) == new.get(k) for k in keys)


def check_target(folder: Path) -> None:
    """Refuse to write a cache into anything but a new or empty folder or a cache: shards and
    a manifest.json mixed into a user's folder (or prepared data) would be hard to undo."""
    if folder.exists() and not folder.is_dir():
        raise DDKError(f"teacher.cache: '{folder}' is a file; set it to a new folder")
    if (folder / MANIFEST).exists():
        read_cache_manifest(folder)  # raises unless it is a cache
    elif folder.is_dir() and any(
        p.name not in (LOCK_NAME, MANIFEST + ".tmp") for p in folder.iterdir()
    ):  # the lock and a half-written manifest: what a run killed before its first shard leaves
        raise DDKError(
            f"teacher.cache: '{folder}' is a non-empty folder that holds no teacher cache; set "
            "teacher.cache to a new or empty folder"
        )


def is_finished(folder: Path, plan: dict) -> bool:
    """A complete cache of exactly this plan with every shard present: a rerun loads no teacher
    and never marks the cache incomplete under a run that reads it."""
    try:
        old = read_cache_manifest(folder)
    except DDKError:
        return False
    return (
        bool(old.get("complete"))
        and same_cache(old, plan)
        and CHECKSUMS_KEY in old  # a cache from before checksums: a rerun checks and adds them
        and not shared_problem(folder, old)
        and not any(
            shard_problem(folder, old, name, j)
            for name, info in old["domains"].items()
            for j in range(info["shards"])
        )
    )
