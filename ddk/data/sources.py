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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ddk.errors import DDKError
from ddk.fileutil import sha256_file

TEXT_SUFFIXES = {".txt"}
RECORD_SUFFIXES = {".jsonl", ".json", ".parquet"}
DATA_SUFFIXES = TEXT_SUFFIXES | RECORD_SUFFIXES
_PARQUET_BATCH = 1024


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
    files = []
    for sub in subdirs:
        found = _data_files(sub)
        if not found:
            raise DDKError(
                f"domain '{sub.name}' ({sub}) holds no .txt/.jsonl/.json/.parquet files; "
                "add text or remove the folder"
            )
        files += [SourceFile(p, sub.name, p.stat().st_size) for p in found]
    return Corpus("folders", files)


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


def _iter_json(source: SourceFile, text_field: str, domain_field: str):
    reader = _HashingReader(source)
    lines = reader.lines()
    first = None
    for number, line in lines:
        if line.strip():
            first = (number, line)
            break
    if first is None:
        return
    if first[1].lstrip().startswith(b"["):
        # A JSON array file: small by nature, parsed whole.
        rest = b"".join([first[1]] + [line for _, line in lines])
        try:
            records = json.loads(rest)
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
        if not line.strip():
            continue
        where = f"{source.path} line {number}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise DDKError(f"{where}: not valid JSON; fix or remove the line") from None
        if not isinstance(rec, dict):
            raise DDKError(f"{where}: expected a JSON object with a '{text_field}' field")
        yield _record_domain(rec, source, domain_field, where), _record_text(rec, text_field, where)


def _iter_parquet(source: SourceFile, text_field: str, domain_field: str):
    import pyarrow.parquet as pq

    _hash_file(source)
    try:
        pf = pq.ParquetFile(source.path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DDKError(f"{source.path}: not a readable Parquet file ({type(e).__name__})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DDKError(f"{source.path}: no '{text_field}' column; set prepare.text_field")
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


def _iter_txt(source: SourceFile):
    reader = _HashingReader(source)
    data = b"".join(line for _, line in reader.lines())
    text = data.decode("utf-8", errors="replace")
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
