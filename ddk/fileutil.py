"""Small file helpers shared by data preparation, caches, checkpoints and the final model."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, read in 4 MiB chunks so large shards never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, value, *, sort_keys: bool = False) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(value, fh, indent=2, sort_keys=sort_keys)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where folders cannot be
    opened (some filesystems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, dest: Path, aside: Path) -> None:
    """Put the finished folder `tmp` in place as `dest`, so `dest` holds a whole folder or
    the previous one: an existing `dest` is first renamed to `aside` and deleted only once the
    new one is in place, and the parent folder is fsynced after the rename."""
    old = None
    if dest.exists():
        dest.rename(aside)
        old = aside
    tmp.rename(dest)
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def disk_full(e: BaseException) -> bool:
    """Whether `e` means the disk (or quota) is full. safetensors and torch.save report it as
    their own errors naming the OS error; numpy's short writes carry no errno."""
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        text = str(e)
        if e.errno is None and "requested and" in text and "written" in text:
            return True
    text = str(e)
    return "No space left" in text or "code: 28" in text or "Disk quota" in text


def human_bytes(n: float, unit: str | None = None) -> str:
    """'1.5 MB' (decimal units, chosen by size), or `n` in one binary unit: unit='MiB'."""
    if unit is not None:
        power = {"KiB": 1, "MiB": 2, "GiB": 3}[unit]
        return f"{n / 2 ** (10 * power):.1f} {unit}"
    for name in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {name}" if name == "B" else f"{n:.1f} {name}"
        n /= 1000
    return f"{n:.1f} TB"
