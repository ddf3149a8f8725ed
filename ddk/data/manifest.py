"""The on-disk contract of prepared data: a typed `Manifest`, its one reader and one writer.

`manifest.json` describes what `ddk prepare` wrote (tokenizer, seq_len, per-domain splits) and
lists every file it wrote under `owner`, so `--overwrite` can tell ddk's folder from a user's.
Everything read from it is validated here: a missing key, a wrong type or a domain folder that
points outside the data folder is one line naming the key, never a KeyError deep in a run.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ddk.errors import DDKError
from ddk.fileutil import write_json_atomic
from ddk.lock import LOCK_NAME
from ddk.ownership import is_owned, list_files, ownership_record, read_record

MANIFEST = "manifest.json"
FORMAT = "ddk.prepared"
# 2: test split, BOS setting, duplicate counts, held-out hashes, owner.
# 3: held-out texts unique across domains; held-out windows of one document each (up to
#    heldout_windows_per_document per document); token counts of what no split keeps.
# 4: chat data: a loss-mask file beside each split's tokens (`ddk.data.packing`) and the `chat`
#    key. Raw text is still written as 3, so an older ddk reads it; it refuses chat data.
FORMAT_VERSION = 4
TEXT_FORMAT_VERSION = 3
CHAT_FORMAT_VERSION = 4
OWNER_KIND = "prepared"
SPLITS = ("train", "val", "test")


class _Model(BaseModel):
    # strict: a "512" where 512 belongs is a corrupt manifest, not something to coerce;
    # extra="allow": fields another ddk component adds survive a read-write round trip.
    model_config = ConfigDict(strict=True, extra="allow")


class TokenizerInfo(_Model):
    name_or_path: str
    vocab_size: int = Field(ge=1)
    eos_token_id: int
    bos_token_id: int | None = None
    vocab_sha256: str | None = None


class DomainInfo(_Model):
    """One domain's folder and, per split, documents, tokens and windows ("sequences")."""

    folder: str
    documents: int = Field(ge=0)
    train_documents: int = Field(ge=0)
    train_tokens: int = Field(ge=0)
    train_sequences: int = Field(ge=0)
    val_documents: int = Field(ge=0)
    val_tokens: int = Field(ge=0)
    val_sequences: int = Field(ge=0)
    # None in data prepared before format 2 (no test split, no duplicate check)
    test_documents: int | None = Field(None, ge=0)
    test_tokens: int | None = Field(None, ge=0)
    test_sequences: int | None = Field(None, ge=0)
    duplicates_dropped: int | None = Field(None, ge=0)
    # None before format 3: all tokens of the domain's documents, those of held-out documents
    # beyond their windows, and those of dropped copies of held-out texts (in no split)
    total_tokens: int | None = Field(None, ge=0)
    heldout_unused_tokens: int | None = Field(None, ge=0)
    duplicate_tokens: int | None = Field(None, ge=0)

    @field_validator("folder")
    @classmethod
    def _inside_data_folder(cls, v: str) -> str:
        posix, windows = PurePosixPath(v), PureWindowsPath(v)
        if (
            not v
            or posix.is_absolute()
            or windows.is_absolute()
            or windows.drive
            or any(part in ("", ".", "..") for part in v.replace("\\", "/").split("/"))
        ):
            raise ValueError(
                f"'{v}' is not a folder name inside the data folder (absolute paths and '..' "
                "are refused)"
            )
        return v

    def tokens(self, split: str) -> int | None:
        return getattr(self, f"{split}_tokens")

    def sequences(self, split: str) -> int | None:
        return getattr(self, f"{split}_sequences")


class ChatInfo(_Model):
    """Chat data: how conversations were rendered and which tokens their masks train on."""

    template_sha256: str
    template_source: str
    spans_from: Literal["generation", "prefix"]
    train_on: Literal["assistant", "all", "last_turn"]
    packing: Literal["isolated", "padded"]
    pad_token_id: int
    mask_suffix: str = ".mask"


class Manifest(_Model):
    format: Literal["ddk.prepared"] | None = None  # absent before format 2
    format_version: int = Field(ge=1)
    ddk_version: str
    created: str
    seconds: float | None = None
    tokenizer: TokenizerInfo
    token_dtype: Literal["uint16", "uint32"]
    seq_len: int = Field(ge=1)
    val_sequences: int = Field(ge=1)
    test_sequences: int | None = Field(None, ge=1)
    add_bos: bool | None = None
    heldout_windows_per_document: int | None = Field(None, ge=1)  # None before format 3
    seed: int = 0
    text_field: str | None = None
    domain_field: str | None = None
    layout: str | None = None
    sources: list[dict] = Field(default_factory=list)
    fingerprint: dict = Field(default_factory=dict)
    domains: dict[str, DomainInfo] = Field(min_length=1)
    chat: ChatInfo | None = None  # chat data (format 4): every split has a loss mask
    owner: dict | None = None  # ddk.ownership record: every file the writer found in the folder

    def has_split(self, split: str) -> bool:
        """Whether every domain has `split` (data prepared before the test split has none)."""
        return split in SPLITS and all(d.tokens(split) is not None for d in self.domains.values())


# DomainInfo keys that are optional in old formats and required from a format on.
_REQUIRED_SINCE = {
    2: ("test_documents", "test_tokens", "test_sequences", "duplicates_dropped"),
    3: ("total_tokens", "heldout_unused_tokens", "duplicate_tokens"),
}


def _key(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _one_line(path: Path, error: ValidationError) -> str:
    first = error.errors()[0]
    key = _key(first["loc"])
    if first["type"] == "missing":
        problem = f"key '{key}' is missing"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        problem = f"key '{key}' is invalid: {msg}"
    return f"{path}: {problem}; prepare the data again with `ddk prepare`"


def parse_manifest(data: object, path: Path) -> Manifest:
    """Validate an already-decoded manifest (`path` only names it in errors)."""
    if not isinstance(data, dict):
        raise DDKError(f"{path} is not a JSON object; prepare the data again with `ddk prepare`")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        raise DDKError(_one_line(path, e)) from None
    if manifest.format_version > FORMAT_VERSION:
        raise DDKError(
            f"{path} has format {manifest.format_version}, newer than this ddk reads "
            f"({FORMAT_VERSION}); upgrade ddk"
        )
    required = [key for version, keys in _REQUIRED_SINCE.items() for key in keys
                if manifest.format_version >= version]  # fmt: skip
    for name, info in manifest.domains.items():
        for key in required:
            if getattr(info, key) is None:
                raise DDKError(
                    f"{path}: key 'domains.{name}.{key}' is missing; prepare the data again "
                    "with `ddk prepare`"
                )
    if manifest.format_version >= 3 and manifest.heldout_windows_per_document is None:
        raise DDKError(
            f"{path}: key 'heldout_windows_per_document' is missing; prepare the data again with "
            "`ddk prepare`"
        )
    return manifest


def read_manifest(folder: str | Path) -> Manifest:
    """The one reader: `folder/manifest.json`, validated, or a one-line DDKError."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DDKError(f"'{folder}' is not prepared data (no {MANIFEST}); run `ddk prepare` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DDKError(f"{path} is corrupt (not JSON); prepare the data again") from None
    except OSError as e:
        raise DDKError(f"cannot read {path}: {e.strerror}") from None
    if isinstance(data, dict) and "teacher_fingerprint" in data:  # a teacher cache's manifest
        raise DDKError(
            f"'{folder}' is a teacher cache (written by `ddk cache-teacher`), not prepared "
            "data; give the output folder of `ddk prepare`"
        )
    return parse_manifest(data, path)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """The one writer. Call it last, when `folder` is otherwise complete: it records every file
    now in the folder (and the manifest itself) as ddk's, for `--overwrite` to check later."""
    files = [f for f in list_files(folder) if f not in (LOCK_NAME, MANIFEST)] + [MANIFEST]
    manifest.format = FORMAT
    manifest.format_version = CHAT_FORMAT_VERSION if manifest.chat else TEXT_FORMAT_VERSION
    manifest.owner = ownership_record(OWNER_KIND, files)
    write_json_atomic(folder / MANIFEST, manifest.model_dump(mode="json"))


def read_owner(folder: Path) -> dict | None:
    """The ownership record of a prepared folder, or None when it has no valid one (never
    raises: a folder with a broken manifest is simply not known to be ddk's)."""
    data = read_record(folder / MANIFEST)
    if data is None or data.get("format") != FORMAT:
        return None
    owner = data.get("owner")
    return owner if is_owned(owner, OWNER_KIND) else None


def domain_path(root: Path, info: DomainInfo) -> Path:
    """A domain's folder: its name was checked to stay inside `root` when read, and a link
    there that leads out of `root` is refused too."""
    path = root / info.folder
    confine(root, path)
    return path


def confine(root: Path, path: Path) -> None:
    """One-line DDKError when `path`, links followed, lies outside `root`. ddk never writes
    links into prepared data, so one that leads out is a crafted or hand-assembled folder."""
    if path.exists() and not path.resolve().is_relative_to(root.resolve()):
        raise DDKError(
            f"'{path}' is a link to '{path.resolve()}', outside the prepared data folder "
            f"'{root}'; ddk reads only files inside it: prepare the data again"
        )


def read_array(root: Path, path: Path, dtype: np.dtype, columns: int | None = None) -> np.ndarray:
    """A `.npy` file of prepared data, checked: inside `root`, a plain array (never a pickle) of
    `dtype`, one-dimensional or with `columns` columns; anything else is a one-line DDKError."""
    confine(root, path)
    again = "prepare the data again with `ddk prepare`"
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DDKError(f"'{path}' is missing; {again}") from None
    except (ValueError, OSError, EOFError) as e:
        reason = "it holds pickled objects" if "pickle" in str(e) else "it is corrupt"
        raise DDKError(f"'{path}' is not a numpy array file ({reason}); {again}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise DDKError(f"'{path}' is an archive of arrays, not one array; {again}")
    shape = array.shape[:1] + (() if columns is None else (columns,))
    if array.dtype != dtype or array.ndim == 0 or array.shape != shape:
        want = "[n]" if columns is None else f"[n, {columns}]"
        raise DDKError(
            f"'{path}' holds {array.dtype} values of shape {list(array.shape)}, not {dtype.name} "
            f"of shape {want}; {again}"
        )
    return array
