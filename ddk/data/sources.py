"""Reading a multi-domain corpus as a stream of (domain, text) documents.

Layouts a user has:
  * a folder with one sub-folder per domain holding .txt (one document per file),
    .jsonl/.json (one document per record, text in `text_field`) or .parquet files;
  * a JSONL/JSON/Parquet file (or a folder of them) whose records carry a `domain_field`;
  * a Hugging Face `datasets` dataset saved with `save_to_disk` (records carry `domain_field`).
Everything is read lazily so memory stays bounded for corpora larger than RAM.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ddk.errors import DDKError
from ddk.fileutil import sha256_file

TEXT_SUFFIXES = {".txt"}
RECORD_SUFFIXES = {".jsonl", ".json", ".parquet"}
DATA_SUFFIXES = TEXT_SUFFIXES | RECORD_SUFFIXES
_PARQUET_BATCH = 1024
_SNIFF_BYTES = 1 << 16  # the head of a file whose characters are checked for binary content
# A file whose undecodable or control characters exceed this share is binary, not text: text in
# a legacy encoding (Latin-1, ...) stays far below it, executables and images far above.
_BINARY_SHARE = 0.3
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # also the start of the UTF-32 ones
_CONTROL = dict.fromkeys([*range(0, 9), 11, *range(14, 32), 127])


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _check_not_utf16(head: bytes, path: Path) -> None:
    if head.startswith(_UTF16_BOMS):
        raise DDKError(
            f"{path} is UTF-16 text (it starts with a byte-order mark); ddk reads UTF-8: convert "
            "it, e.g. `iconv -f UTF-16 -t UTF-8`"
        )


def binary_reason(data: bytes) -> str | None:
    """Why `data` is not text (NUL bytes, or mostly undecodable/control characters in its
    head), or None."""
    if b"\x00" in data:
        return "NUL bytes; if it is UTF-16 text, convert it to UTF-8"
    if not data:
        return None
    text = data[:_SNIFF_BYTES].decode("utf-8", errors="replace")
    odd = text.count("\ufffd") + len(text) - len(text.translate(_CONTROL))
    if odd > _BINARY_SHARE * len(text):
        return f"{odd / len(text):.0%} undecodable or control characters"
    return None


def _skip_binary(source: SourceFile, reason: str) -> None:
    _warn(f"skipping '{source.path}' of domain '{source.domain}': binary, not text ({reason})")


def _decode(data: bytes, where: str, offset: int = 0) -> str:
    """Strict UTF-8, with an error naming the first bad byte's offset in its file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DDKError(
            f"{where}: not UTF-8 (invalid byte at offset {offset + e.start}); convert the file "
            "to UTF-8"
        ) from None


@dataclass
class SourceFile:
    path: Path
    domain: str | None  # None: every record names its domain
    size: int
    sha256: str = ""
    mtime_ns: int = 0

    def __post_init__(self):
        if not self.mtime_ns and self.path.exists():
            self.mtime_ns = self.path.stat().st_mtime_ns


@dataclass
class Corpus:
    """What `discover` found: the files to read and how domains are assigned."""

    layout: str  # "folders" | "domain_field" | "hf_dataset"
    files: list[SourceFile] = field(default_factory=list)
    dataset_path: Path | None = None


def _data_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def discover(input_path: str | Path) -> Corpus:
    """Work out the layout of `input_path`; raise DDKError naming what is wrong."""
    root = Path(input_path).expanduser()
    if not root.exists():
        raise DDKError(f"input path '{input_path}' does not exist")
    if root.is_file():
        if root.suffix.lower() not in RECORD_SUFFIXES:
            raise DDKError(
                f"input file '{root}' must be .jsonl, .json or .parquet with a domain field "
                "(or give a folder with one sub-folder per domain)"
            )
        return Corpus("domain_field", [SourceFile(root, None, root.stat().st_size)])
    if (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists():
        arrow = sorted(root.rglob("*.arrow"))  # listed now so the fingerprint sees changes
        return Corpus("hf_dataset", [SourceFile(p, None, p.stat().st_size) for p in arrow], root)

    entries = _visible(root)
    subdirs = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in DATA_SUFFIXES]
    if subdirs and loose:
        raise DDKError(
            f"'{root}' mixes domain sub-folders ({subdirs[0].name}/) with data files "
            f"({loose[0].name}); use one sub-folder per domain or files with a domain field, not both"
        )
    if loose:
        if any(p.suffix.lower() in TEXT_SUFFIXES for p in loose):
            txt = next(p for p in loose if p.suffix.lower() in TEXT_SUFFIXES)
            raise DDKError(
                f"'{txt}' is a .txt file at the top of '{root}': put text files in one "
                "sub-folder per domain"
            )
        return Corpus("domain_field", [SourceFile(p, None, p.stat().st_size) for p in loose])
    if not subdirs:
        raise DDKError(f"'{root}' holds no domain sub-folders and no .jsonl/.json/.parquet files")
    real_root = root.resolve()
    subdirs = [sub for sub in subdirs if not _loops_back(sub, real_root)]
    if not subdirs:
        raise DDKError(f"'{root}' holds no domain sub-folders besides links back into it")
    files = []
    for sub in subdirs:
        found = [p for p in _data_files(sub) if not _duplicate_link(p, real_root)]
        if not found:
            raise DDKError(
                f"domain '{sub.name}' ({sub}) holds no .txt/.jsonl/.json/.parquet files; "
                "add text or remove the folder"
            )
        files += [SourceFile(p, sub.name, p.stat().st_size) for p in found]
    return Corpus("folders", files)


def _loops_back(sub: Path, real_root: Path) -> bool:
    """A domain folder that is a link into or above the corpus root would read its files twice."""
    if not sub.is_symlink():
        return False
    target = sub.resolve()
    if target == real_root or real_root in target.parents or target in real_root.parents:
        _warn(f"skipping '{sub}': a link to '{target}', inside or above the corpus")
        return True
    return False


def _duplicate_link(path: Path, real_root: Path) -> bool:
    """A data file that links to another file of the corpus is read there already."""
    if not path.is_symlink():
        return False
    target = path.resolve()
    if real_root in target.parents:
        _warn(f"skipping '{path}': a link to '{target}', which is inside the corpus")
        return True
    return False


class _HashingReader:
    """Reads a file's lines while hashing its bytes, so sources are hashed in the same pass."""

    def __init__(self, source: SourceFile):
        self.source = source
        self.hasher = hashlib.sha256()

    def lines(self) -> Iterator[tuple[int, bytes]]:
        with open(self.source.path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                self.hasher.update(line)
                yield number, line
        self.source.sha256 = self.hasher.hexdigest()


def _hash_file(source: SourceFile) -> None:
    source.sha256 = sha256_file(source.path)


def _record_domain(record: dict, source: SourceFile, domain_field: str | None, where: str):
    if source.domain is not None or domain_field is None:  # None: labels not read
        return source.domain
    return _domain_value(record.get(domain_field), domain_field, where)


def _domain_value(value, domain_field: str, where: str) -> str:
    if value is None:
        raise DDKError(
            f"{where}: record has no '{domain_field}' field; add it or set prepare.domain_field"
        )
    return str(value)


def _record_text(record: dict, text_field: str, where: str) -> str:
    if text_field not in record:
        raise DDKError(f"{where}: record has no '{text_field}' field; set prepare.text_field")
    text = record[text_field]
    if not isinstance(text, str):
        raise DDKError(f"{where}: field '{text_field}' is {type(text).__name__}, not text")
    return text


def _sniff(source: SourceFile) -> bool:
    """Whether to read a record file: UTF-16 is an error, binary in a domain folder skipped."""
    with open(source.path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    _check_not_utf16(head, source.path)
    reason = binary_reason(head) if source.domain is not None else None
    if reason:
        _skip_binary(source, reason)
        _hash_file(source)
    return reason is None


def _iter_json(source: SourceFile, text_field: str, domain_field: str):
    if not _sniff(source):
        return
    reader = _HashingReader(source)
    lines = reader.lines()
    first = None
    offset = 0  # of the current line in the file, for error messages
    for number, line in lines:
        if line.strip():
            first = (number, line)
            break
        offset += len(line)
    if first is None:
        return
    if first[1].startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, harmless
        first = (first[0], first[1][3:])
        offset += 3
    if first[1].lstrip().startswith(b"["):
        # A JSON array file: small by nature, parsed whole.
        rest = b"".join([first[1]] + [line for _, line in lines])
        try:
            text = rest.decode("utf-8")
        except UnicodeDecodeError as e:
            line_no = first[0] + rest[: e.start].count(b"\n")
            where = f"{source.path} line {line_no}"
            text = _decode(rest, where, offset)  # raises, naming the byte
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DDKError(f"{source.path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        for i, rec in enumerate(records):
            where = f"{source.path} item {i}"
            if not isinstance(rec, dict):
                raise DDKError(f"{where}: expected a JSON object with a '{text_field}' field")
            yield (
                _record_domain(rec, source, domain_field, where),
                _record_text(rec, text_field, where),
            )
        return

    def all_lines():
        yield first
        yield from lines

    for number, line in all_lines():
        start, offset = offset, offset + len(line)
        if not line.strip():
            continue
        where = f"{source.path} line {number}"
        text = _decode(line, where, start)
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            raise DDKError(f"{where}: not valid JSON; fix or remove the line") from None
        if not isinstance(rec, dict):
            raise DDKError(f"{where}: expected a JSON object with a '{text_field}' field")
        yield _record_domain(rec, source, domain_field, where), _record_text(rec, text_field, where)


def _iter_parquet(source: SourceFile, text_field: str, domain_field: str):
    _hash_file(source)
    try:
        pf = pq.ParquetFile(source.path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DDKError(f"{source.path}: not a readable Parquet file ({type(e).__name__})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DDKError(f"{source.path}: no '{text_field}' column; set prepare.text_field")
    column_type = pf.schema_arrow.field(text_field).type
    if not is_text_type(column_type):
        raise DDKError(
            f"{source.path}: column '{text_field}' holds {column_type}, not strings; set "
            "prepare.text_field to the text column"
        )
    columns = [text_field]
    if source.domain is None and domain_field is not None:
        if domain_field not in names:
            raise DDKError(
                f"{source.path}: no '{domain_field}' column; add it or set prepare.domain_field"
            )
        columns.append(domain_field)
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
        texts = batch.column(text_field).to_pylist()
        domains = batch.column(domain_field).to_pylist() if len(columns) > 1 else None
        for i, text in enumerate(texts):
            row += 1
            if text is None:
                continue
            if domains is None:
                yield source.domain, text
            else:
                yield _domain_value(domains[i], domain_field, f"{source.path} row {row}"), text


def is_text_type(arrow_type) -> bool:
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or getattr(pa.types, "is_string_view", lambda _: False)(arrow_type)
    )


def _iter_txt(source: SourceFile):
    data = source.path.read_bytes()  # one document: read whole, hashed from memory
    source.sha256 = hashlib.sha256(data).hexdigest()
    _check_not_utf16(data, source.path)
    reason = binary_reason(data)
    if reason:
        _skip_binary(source, reason)
        return
    text = _decode(data, str(source.path))
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark is not part of the text
        text = text[1:]
    if text.strip():
        yield source.domain, text


def iter_documents(corpus: Corpus, text_field: str, domain_field: str | None):
    """Yield (domain, text, 0) per document in corpus order, and (domain, None, bytes) when a
    file is finished (domain None for files whose records name their domains). domain_field
    None reads no labels (an unlabelled corpus): a document's domain is then its folder or None."""
    if corpus.layout == "hf_dataset":
        yield from _iter_hf_dataset(corpus, text_field, domain_field)
        return
    for source in corpus.files:
        suffix = source.path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            docs = _iter_txt(source)
        elif suffix == ".parquet":
            docs = _iter_parquet(source, text_field, domain_field)
        else:
            docs = _iter_json(source, text_field, domain_field)
        for domain, text in docs:
            yield domain, text, 0
        yield source.domain, None, source.size  # file finished


def _iter_hf_dataset(corpus: Corpus, text_field: str, domain_field: str):
    try:
        import datasets
    except ImportError:
        raise DDKError(
            "reading a saved `datasets` dataset needs the datasets package: "
            "pip install 'ddk-distill[datasets]'"
        ) from None
    ds = datasets.load_from_disk(str(corpus.dataset_path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DDKError(f"{corpus.dataset_path}: a DatasetDict needs a 'train' split")
        ds = ds["train"]
    columns = [text_field] if domain_field is None else [text_field, domain_field]
    for name in columns:
        if name not in ds.column_names:
            raise DDKError(
                f"{corpus.dataset_path}: dataset has no '{name}' column "
                f"(columns: {', '.join(ds.column_names)})"
            )
    dtype = getattr(ds.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DDKError(
            f"{corpus.dataset_path}: column '{text_field}' holds {dtype or 'nested values'}, not "
            "strings; set prepare.text_field to the text column"
        )
    for f in corpus.files:
        _hash_file(f)
    row = 0
    for batch in ds.select_columns(columns).iter(batch_size=_PARQUET_BATCH):
        labels = (
            batch[domain_field] if domain_field is not None else [None] * len(batch[text_field])
        )
        for text, domain in zip(batch[text_field], labels):
            row += 1
            if text is not None and domain_field is None:
                yield None, text, 0
            elif text is not None:
                where = f"{corpus.dataset_path} row {row}"
                yield _domain_value(domain, domain_field, where), text, 0
    yield None, None, sum(f.size for f in corpus.files)  # dataset finished
