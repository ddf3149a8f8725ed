"""What makes two things "the same" for ddk's resumes and caches: one module, named strengths.

Prepared data (a `ddk prepare` folder) is fingerprinted at one of three strengths:

    RECORD   the manifest's description of the tokens: creation time, vocabulary, seq_len,
             token dtype, and every domain's train tokens and sequences. Free, survives copies,
             but blind to a shard edited in place.
    FILES    the manifest's bytes plus every other file's path, size and modification time.
             Stat only; notices a shard edited in place; a copy that resets modification times
             reads as other data.
    CONTENT  the manifest's bytes plus the SHA-256 of every token shard of the chosen splits.
             Notices a shard edited in place and survives copies; reads each new or changed
             shard once (hashes are memoised by path, size and modification time).

A teacher (a model folder) is fingerprinted by its FILES (SHA-256 over config.json and the
SHA-256 of each weight file: contents, not paths or times, memoised the same way), or, when its
files are not on this machine, only by the NAME a config gives it; "as evaluated" adds the dtype
it runs in.

Who uses which (and why):

    --resume        data FILES, recorded in every checkpoint: a run resumes where it ran, and
                    any change to its data refuses the resume.
    teacher ppl     data CONTENT of the held-out splits + teacher FILES + dtype: the key of the
      cache         shared teacher-perplexity cache (what the perplexities depend on, no more).
    teacher cache   data RECORD (its format-1 key) + data CONTENT of every split it depends on
                    (train for the signal, val/test for its perplexities) + teacher FILES, or the
                    teacher's NAME when training on a machine without the teacher.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from enum import Enum
from pathlib import Path

from ddk.data.manifest import MANIFEST, SPLITS, read_manifest
from ddk.data.packing import MASK_SUFFIX
from ddk.errors import DDKError
from ddk.fileutil import sha256_file, write_json_atomic
from ddk.models import WEIGHT_SUFFIXES, local_model_folder

MEMO_FILE = "file_sha256.json"  # memo of file hashes by (path, size, mtime)


class Strength(str, Enum):
    RECORD = "record"
    FILES = "files"
    CONTENT = "content"


class FileHashMemo:
    """SHA-256 of files, remembered by (resolved path, size, mtime) in a JSON file, so a file is
    read again only when it changed (or moved). `path=None`: remembered for this process only."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self._hashes: dict[str, str] = {}
        if path is not None:
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads(path.read_text())
                if isinstance(loaded, dict):
                    self._hashes = loaded
        self._changed = False

    def sha256(self, file: Path) -> str:
        st = file.stat()
        key = f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self._hashes:
            self._hashes[key] = sha256_file(file)
            self._changed = True
        return self._hashes[key]

    def save(self) -> None:
        """Best effort: an unwritable cache folder only costs hashing again next time."""
        if self.path is not None and self._changed:
            with contextlib.suppress(OSError):
                write_json_atomic(self.path, self._hashes)
            self._changed = False


# ---------------------------------------------------------------------------------- data
def record_fingerprint(manifest) -> str:
    """Data at RECORD strength, from the prepared manifest (a dict or the typed `Manifest`)."""
    if hasattr(manifest, "model_dump"):
        manifest = manifest.model_dump(mode="json")
    key = {
        "created": manifest.get("created"),
        "vocab_sha256": manifest["tokenizer"].get("vocab_sha256"),
        "vocab_size": manifest["tokenizer"]["vocab_size"],
        "seq_len": manifest["seq_len"],
        "token_dtype": manifest["token_dtype"],
        "domains": {
            n: [d["train_tokens"], d["train_sequences"]] for n, d in manifest["domains"].items()
        },
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def data_fingerprint(
    prepared: str | Path,
    strength: Strength = Strength.FILES,
    *,
    splits: tuple[str, ...] = SPLITS,
    memo: FileHashMemo | None = None,
) -> str | None:
    """The prepared data folder at `strength` (CONTENT: only the shards of `splits`); None when
    the folder has no manifest to read."""
    folder = Path(prepared).expanduser()
    if strength is Strength.RECORD:
        try:
            return record_fingerprint(read_manifest(folder))
        except DDKError:
            return None
    try:
        h = hashlib.sha256(sha256_file(folder / MANIFEST).encode())
    except OSError:
        return None
    if strength is Strength.FILES:
        for path in _data_files(folder):
            st = path.stat()
            h.update(
                f"{path.relative_to(folder).as_posix()}:{st.st_size}:{st.st_mtime_ns};".encode()
            )
        return h.hexdigest()
    memo = memo if memo is not None else FileHashMemo()
    names = {f"{split}{suffix}" for split in splits for suffix in (".bin", MASK_SUFFIX)}
    for path in _data_files(folder):
        if path.name in names:
            h.update(f"{path.relative_to(folder).as_posix()}:{memo.sha256(path)};".encode())
    memo.save()
    return h.hexdigest()


def _data_files(folder: Path) -> list[Path]:
    """Every file of a prepared folder but its manifest and hidden files (lock files)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    )


# ---------------------------------------------------------------------------------- teacher
def teacher_on_disk(name: str) -> bool:
    """Whether the teacher's files are on this machine (an offline run may lack them)."""
    try:
        return local_model_folder(name, "teacher") is not None
    except DDKError:  # a local path that does not exist here
        return False


def model_files_fingerprint(
    folder: Path, file_hash: Callable[[Path], str] = sha256_file
) -> str | None:
    """SHA-256 over the SHA-256 of config.json and of every weight file in `folder` (content,
    not paths or times); None when it holds no weight file."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{file_hash(p)}\n".encode())
    return h.hexdigest()


def teacher_fingerprint(name: str, memo: FileHashMemo | None = None) -> str:
    """The teacher at FILES strength; DDKError when its files are not on this machine."""
    folder = local_model_folder(name, "teacher")
    if folder is None:
        raise DDKError(
            f"teacher '{name}' is not a local folder or a downloaded hub model; its weights must "
            "be on disk to fingerprint the cache"
        )
    memo = memo if memo is not None else FileHashMemo()
    fingerprint = model_files_fingerprint(folder, memo.sha256)
    memo.save()
    if fingerprint is None:
        raise DDKError(f"teacher '{name}' has no weight files in '{folder}'")
    return fingerprint


def evaluated_teacher_fingerprint(name: str, dtype: str, store: Path) -> str | None:
    """The teacher's FILES and the dtype it is evaluated in, weight hashes memoised in
    `store`; None when its files cannot be found (its perplexities are then computed for the
    run alone)."""
    folder = local_model_folder(name, "teacher")
    if folder is None or not (folder / "config.json").is_file():
        return None
    memo = FileHashMemo(store / MEMO_FILE)
    files = model_files_fingerprint(folder, memo.sha256)
    memo.save()
    if files is None:
        return None
    return hashlib.sha256(f"dtype={dtype}\n{files}".encode()).hexdigest()
