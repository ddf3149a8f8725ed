"""One process per folder: an exclusive OS lock (`flock`) on a lock file inside it.

The kernel drops the lock when its holder exits, however it exits (SIGKILL included), so a
crashed run never leaves a stale lock behind; the file itself stays and only records the PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ddk.errors import DDKError

LOCK_NAME = ".ddk.lock"


class FolderLock:
    """Hold `folder/.ddk.lock` exclusively until `release()` (or process exit)."""

    def __init__(self, folder: str | Path, what: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DDKError(f"cannot create '{self.path}': {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DDKError(
                f"'{self.folder}' is in use by another ddk process (PID {holder}); wait for it to "
                f"finish or {self.what} elsewhere"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked(folder: str | Path, what: str) -> Iterator[FolderLock]:
    with FolderLock(folder, what) as lock:
        yield lock


def raise_if_held(folder: str | Path, what: str) -> None:
    """Raise FolderLock's one-line error when another process holds `folder`'s lock; changes
    nothing on disk (for checks that must not touch a folder they then refuse)."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        raise DDKError(
            f"'{folder}' is in use by another ddk process (PID {holder}); wait for it to "
            f"finish or {what} elsewhere"
        ) from None
    finally:
        os.close(fd)  # closing drops a lock this probe took
