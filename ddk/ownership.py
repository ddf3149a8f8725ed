"""What ddk may replace: only folders that it wrote itself, as it left them.

A folder ddk writes (prepared data, a demo's output, a report) carries a record naming its kind,
ddk's format version and every file it wrote. `--overwrite` (and the demo/report re-runs) may
replace such a folder; anything else, even a folder with a parseable manifest, is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ddk.errors import DDKError
from ddk.lock import LOCK_NAME

OWNER_FORMAT = "ddk"
OWNER_VERSION = 1
# Files ddk itself may leave in a folder besides the ones a record lists.
_ALWAYS_ALLOWED = {LOCK_NAME}


def list_files(folder: Path) -> list[str]:
    """Every file under `folder`, as sorted POSIX paths relative to it (symlinks as files,
    never followed)."""
    out = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        links = [d for d in dirs if (here / d).is_symlink()]
        dirs[:] = [d for d in dirs if d not in links]
        out += [(here / f).relative_to(folder).as_posix() for f in [*files, *links]]
    return sorted(out)


def links_in(folder: Path, names: list[str] | None = None) -> list[str]:
    """The symlinks among `names` in `folder` (every entry under it when None)."""
    if names is None:
        return [f for f in list_files(folder) if (folder / f).is_symlink()]
    return [n for n in names if (folder / n).is_symlink()]


def refuse_links(
    folder: Path, what: str, names: list[str] | None = None, folder_too: bool = True
) -> None:
    """One line unless neither `folder` nor anything ddk would write or delete in it (`names`,
    or everything under it) is a symlink: ddk creates none, so a link is the user's, and
    writing or deleting through it would change files outside the folder."""
    if folder_too and folder.is_symlink():
        raise DDKError(
            f"{what} is a symlink to '{os.readlink(folder)}'; ddk never writes or deletes "
            "through a link: give the folder it points to"
        )
    if folder.is_dir():
        links = links_in(folder, names)
        if links:
            raise DDKError(
                f"{what} holds a symlink ({links[0]}); ddk never writes or deletes through a "
                "link it did not create: remove it or choose another folder"
            )


def ownership_record(kind: str, files: list[str]) -> dict:
    return {"format": OWNER_FORMAT, "kind": kind, "version": OWNER_VERSION, "files": sorted(files)}


def is_owned(record: object, kind: str) -> bool:
    return (
        isinstance(record, dict)
        and record.get("format") == OWNER_FORMAT
        and record.get("kind") == kind
        and record.get("version") == OWNER_VERSION
        and isinstance(record.get("files"), list)
    )


def foreign_files(folder: Path, record: dict, ignore: set[str] = frozenset()) -> list[str]:
    """Files in `folder` that the record does not list (and that ddk did not write)."""
    listed = set(record.get("files", [])) | _ALWAYS_ALLOWED | set(ignore)
    return [f for f in list_files(folder) if f not in listed]


def check_replaceable(folder: Path, record: object, kind: str, what: str) -> None:
    """Raise a one-line DDKError unless `folder` is missing, empty, or wholly ddk's `kind`.

    `record` is the folder's ownership record (None when it has none); `what` names the folder
    for the message, e.g. "output 'data/'".
    """
    refuse_links(folder, what)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise DDKError(f"{what} is a file; choose a folder")
    present = [f for f in list_files(folder) if f not in _ALWAYS_ALLOWED]
    if not present:
        return
    if not is_owned(record, kind):
        raise DDKError(
            f"{what} holds files ddk did not write ({present[0]}, ...); ddk never replaces them: "
            "choose another folder"
        )
    extra = foreign_files(folder, record)
    if extra:
        raise DDKError(
            f"{what} holds {len(extra)} file(s) ddk did not write ({extra[0]}); ddk never "
            "replaces them: move them away or choose another folder"
        )


def read_record(path: Path) -> dict | None:
    """A JSON ownership record, or None when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
