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
    """Hold `folder/.ddk.lock` exclusively until `release()` (or process exit).

    `path` names another lock file, for a folder that does not exist yet (e.g. one created by
    rename): that file is removed on release, so it leaves nothing behind next to the folder.
    """

    def __init__(self, folder: str | Path, what: str, path: str | Path | None = None):
        self.folder = Path(folder)
        self.path = Path(path) if path is not None else self.folder / LOCK_NAME
        self._remove = path is not None
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        while True:
            fd = self._lock_fd()
            if not self._remove or _same_file(fd, self.path):
                break
            # The previous holder removed the file after we opened it: lock the current one.
            os.close(fd)
        with contextlib.suppress(OSError):  # the PID is a courtesy (a full disk may refuse it)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def _lock_fd(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
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
        return fd

    def release(self) -> None:
        if self._fd is not None:
            if self._remove:  # while still holding it, so no one locks a file about to vanish
                with contextlib.suppress(OSError):
                    self.path.unlink()
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


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
