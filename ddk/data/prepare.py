"""`ddk prepare`: a multi-domain corpus -> packed token shards, one folder per domain.

Output layout (all arrays little-endian numpy files; `ddk.data.manifest` owns the contract):
    manifest.json                 domains, splits, tokenizer, seq_len, BOS, sources, owner record
    <domain>/train.bin            flat tokens of the training documents (uint16 or uint32)
    <domain>/train_docs.npy       [n, 2] int64: (document id in corpus order, tokens incl. EOS)
    <domain>/val.bin              validation: the first <= seq_len tokens of each held-out document
    <domain>/val_docs.npy         [n, 2] int64: (document id, tokens it contributed), draw order
    <domain>/test.bin, test_docs.npy   the same for the test split (reporting only)
    <domain>/heldout_hashes.npy   sorted uint64 text hashes of every validation and test document
A "sequence" (window) i of a split is tokens[i*seq_len : (i+1)*seq_len + 1].
Documents are tokenised once without special tokens, then given BOS (prepare.add_bos) and EOS.
Validation and test are disjoint sets of whole documents, at most seq_len tokens from each, so
no single long document fills a held-out set; training drops exact duplicates of them.
"""

from __future__ import annotations

import os
import queue
import shutil
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ddk import __version__
from ddk.config import PrepareSection
from ddk.data import autodomains
from ddk.data.dedup import HASH_DTYPE, text_hash
from ddk.data.longdocs import encode_documents
from ddk.data.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    read_manifest,
    write_manifest,
)
from ddk.data.sources import Corpus, discover, iter_documents
from ddk.data.split import TRAIN, choose_heldout
from ddk.data.vocab import same_vocabulary, token_dtype, vocab_hash
from ddk.errors import DDKError
from ddk.fileutil import disk_full, human_bytes, publish_dir
from ddk.lock import FolderLock
from ddk.models import load_tokenizer
from ddk.ownership import check_replaceable, read_record
from ddk.table import format_table

__all__ = ["prepare", "read_manifest", "same_vocabulary", "token_dtype", "vocab_hash"]
_COPY_CHUNK = 1 << 24  # tokens copied per step when splitting train/val


def _domain_dirname(domain: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in domain).strip(".")
    if not safe:
        raise DDKError(f"domain name '{domain}' has no usable characters for a folder name")
    return safe


@dataclass
class _DomainWriter:
    folder: Path
    dtype: np.dtype
    documents: int = 0
    tokens: int = 0
    _ids: list[int] = field(default_factory=list)
    _lens: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self._tokens_fh = open(self.folder / "all.bin", "ab")
        self._lens_fh = open(self.folder / "all_lens.bin", "ab")
        self._ids_fh = open(self.folder / "all_ids.bin", "ab")
        self._hash_fh = open(self.folder / "all_hash.bin", "ab")

    def append(
        self,
        doc_ids: list[int],
        encodings: list[list[int]],
        eos: int,
        hashes: list[int],
        bos: int | None = None,
    ) -> None:
        """Store documents as [BOS] ids EOS, with their corpus ids and text hashes."""
        head = 0 if bos is None else 1
        lengths = np.fromiter(
            (len(e) + 1 + head for e in encodings), dtype=np.int64, count=len(encodings)
        )
        flat = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for ids in encodings:
            if head:
                flat[pos] = bos
            n = len(ids)
            flat[pos + head : pos + head + n] = ids
            flat[pos + head + n] = eos
            pos += head + n + 1
        # file.write, not ndarray.tofile: a full disk then raises OSError with errno ENOSPC
        self._tokens_fh.write(flat)
        self._lens_fh.write(lengths)
        self._ids_fh.write(np.asarray(doc_ids, dtype=np.int64))
        self._hash_fh.write(np.asarray(hashes, dtype=HASH_DTYPE))
        self.documents += len(encodings)
        self.tokens += pos

    def close(self) -> None:
        for fh in (self._tokens_fh, self._lens_fh, self._ids_fh, self._hash_fh):
            fh.close()


def _fingerprint(cfg: PrepareSection, corpus: Corpus, tokenizer_name: str) -> dict:
    """What makes two prepared folders the same corpus (cheap: no re-hashing)."""
    return {
        "input": str(Path(cfg.input).expanduser().resolve()),
        "files": [[str(f.path.resolve()), f.size, f.mtime_ns] for f in corpus.files],
        "tokenizer": tokenizer_name,
        "seq_len": cfg.seq_len,
        "val_sequences": cfg.val_sequences,
        "test_sequences": cfg.test_sequences,
        "add_bos": cfg.add_bos,
        "format_version": FORMAT_VERSION,
        "seed": cfg.seed,
        "text_field": cfg.text_field,
        "domain_field": cfg.domain_field,
        **autodomains.fingerprint(cfg),
    }


def _check_output(out: Path, fingerprint: dict, overwrite: bool) -> dict | None:
    """Return the existing manifest when `out` already holds this very corpus. Otherwise `out`
    must be missing, empty, or (with `overwrite`) prepared data that ddk wrote and that holds
    nothing else: its manifest's ownership record lists every file in it."""
    if out.exists() and not out.is_dir():
        raise DDKError(f"output '{out}' is a file; choose a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    manifest = read_record(out / MANIFEST) or {}  # lenient: absent or corrupt reads as {}
    if not overwrite and manifest.get("fingerprint") == fingerprint:
        return manifest
    what = f"output '{out}'"
    owner = manifest.get("owner")
    if owner is None and "format_version" in manifest:
        raise DDKError(
            f"{what} was prepared by an older ddk that did not record which files it wrote, so "
            "ddk does not replace it; delete it yourself or choose another output folder"
        )
    check_replaceable(out, owner, "prepared", what)  # never suggests --overwrite
    if overwrite:
        return None
    raise DDKError(
        f"{what} already holds a different prepared corpus; choose another output "
        "folder or pass --overwrite"
    )


def _make_parent(out: Path) -> None:
    """Create the output's parent like `mkdir -p`; it must be writable (the output is renamed
    into it)."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DDKError(
            f"cannot create '{parent}' for output '{out}' ({e.strerror}); choose another output "
            "folder"
        ) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DDKError(
            f"cannot write output '{out}': its parent folder '{parent}' is read-only; choose "
            "another output folder"
        )


def _disk_full(out: Path, corpus: Corpus, dtype: np.dtype) -> DDKError:
    read = sum(f.size for f in corpus.files)
    # At most one token per input byte (byte-level BPE), stored twice at the peak: the
    # tokenised stream and its train/val split.
    need = 2 * read * dtype.itemsize
    free = shutil.disk_usage(out.parent).free
    return DDKError(
        f"disk full while writing output '{out}': preparing {human_bytes(read)} of input needs "
        f"up to {human_bytes(need)} free, {human_bytes(free)} is free; free space or choose "
        "another output folder"
    )


def _check_domains_have_documents(corpus: Corpus, writers: dict) -> None:
    for domain in dict.fromkeys(f.domain for f in corpus.files if f.domain is not None):
        if domain not in writers:
            raise DDKError(
                f"domain '{domain}' has no documents (its files are empty or were skipped), so "
                "prepare stops; add text to it or remove its folder"
            )


def _put(out_q: queue.Queue, item, stop: threading.Event) -> bool:
    """Hand `item` to the main thread unless it has stopped listening (then give up)."""
    while not stop.is_set():
        try:
            out_q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _reader_thread(corpus, cfg, batch_docs, out_q, stop, docs=None):
    """Parse files in a thread so JSON decoding overlaps the (GIL-free) Rust tokenizer.
    `docs`: the document stream to read instead of the corpus (auto-domains relabels it)."""
    buffers: dict[str, tuple[list[int], list[str]]] = {}
    doc_id = 0
    if docs is None:
        docs = iter_documents(corpus, cfg.text_field, cfg.domain_field)
    try:
        for domain, text, done_bytes in docs:
            if text is None:  # a file is finished: progress in bytes
                if not _put(out_q, ("bytes", domain, done_bytes), stop):
                    return
                continue
            if not text.strip():
                continue
            ids, texts = buffers.setdefault(domain, ([], []))
            ids.append(doc_id)
            texts.append(text)
            doc_id += 1
            if len(texts) >= batch_docs and not _put(
                out_q, ("docs", domain, buffers.pop(domain)), stop
            ):
                return
        for domain, batch in buffers.items():
            if not _put(out_q, ("docs", domain, batch), stop):
                return
        _put(out_q, ("end", None, None), stop)
    except BaseException as e:  # handed to the main thread, which re-raises it
        _put(out_q, ("error", e, None), stop)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _split_domain(folder: Path, name: str, cfg: PrepareSection, dtype: np.dtype) -> dict:
    """Hold out whole random documents for validation and test (at most seq_len tokens of
    each), drop training's exact duplicates of them; the rest, in order, is training data."""
    lens = np.fromfile(folder / "all_lens.bin", dtype=np.int64)
    ids = np.fromfile(folder / "all_ids.bin", dtype=np.int64)
    hashes = np.fromfile(folder / "all_hash.bin", dtype=HASH_DTYPE)
    total = int(lens.sum())
    L = cfg.seq_len
    wanted = {"val": cfg.val_sequences, "test": cfg.test_sequences or cfg.val_sequences}
    rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
    # Held-out documents may take at most half of a domain's tokens: training keeps the rest.
    codes, drawn = choose_heldout(lens, hashes, rng.permutation(len(lens)), L, wanted, total // 2)
    tokens = np.memmap(folder / "all.bin", dtype=dtype, mode="r")
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    stats: dict = {"documents": len(lens)}
    for split, docs in drawn.items():
        taken = np.minimum(lens[docs], L) if docs else np.zeros(0, dtype=np.int64)
        with open(folder / f"{split}.bin", "wb") as fh:
            for i, n in zip(docs, taken.tolist()):
                np.asarray(tokens[int(starts[i]) : int(starts[i]) + n]).tofile(fh)
        np.save(folder / f"{split}_docs.npy", np.stack([ids[docs], taken], axis=1))
        n_tokens = int(taken.sum())
        stats[f"{split}_documents"] = len(docs)
        stats[f"{split}_tokens"] = n_tokens
        stats[f"{split}_sequences"] = min(wanted[split], max(0, (n_tokens - 1) // L))
    train = codes == TRAIN
    with open(folder / "train.bin", "wb") as fh:
        # Copy runs of consecutive training documents, not one document at a time.
        change = np.flatnonzero(np.diff(np.concatenate([[0], train.view(np.int8), [0]])))
        for run_start, run_end in zip(change[::2], change[1::2]):
            lo = int(starts[run_start])
            hi = int(starts[run_end - 1] + lens[run_end - 1])
            for a in range(lo, hi, _COPY_CHUNK):
                np.asarray(tokens[a : min(hi, a + _COPY_CHUNK)]).tofile(fh)
    np.save(folder / "train_docs.npy", np.stack([ids[train], lens[train]], axis=1))
    held = codes > TRAIN
    np.save(folder / "heldout_hashes.npy", np.unique(hashes[held]).astype(HASH_DTYPE))
    del tokens
    for tmp in ("all.bin", "all_lens.bin", "all_ids.bin", "all_hash.bin"):
        (folder / tmp).unlink()
    stats["train_documents"] = int(train.sum())
    stats["train_tokens"] = int(lens[train].sum())
    stats["train_sequences"] = max(0, (stats["train_tokens"] - 1) // L)
    stats["duplicates_dropped"] = int((codes < TRAIN).sum())
    if stats["val_sequences"] == 0 or stats["test_sequences"] == 0:
        # A cluster is small because many were asked for: say so first.
        fewer = (
            "ask for fewer domains (prepare.auto_domains / split_domains), "
            if cfg.auto_domains is not None or cfg.split_domains is not None
            else ""
        )
        raise DDKError(
            f"domain '{name}' has too little text to hold out whole documents for validation "
            f"and test windows of {L} tokens ({len(lens)} document(s), {total:,} tokens; held-out "
            f"documents may use at most half of them); {fewer}add text, split its text into more "
            "documents (e.g. JSONL lines) or lower prepare.seq_len"
        )
    if stats["train_sequences"] == 0:
        raise DDKError(
            f"domain '{name}' keeps too little training text ({stats['train_tokens']:,} tokens "
            f"after holding out validation and test documents and "
            f"{stats['duplicates_dropped']} duplicate(s) of them); add text or lower "
            "prepare.seq_len"
        )
    for split, label in (("val", "validation"), ("test", "test")):
        if stats[f"{split}_sequences"] < wanted[split]:
            _warn(
                f"domain '{name}': {label} has {stats[f'{split}_sequences']} of "
                f"{wanted[split]} windows, from {stats[f'{split}_documents']} documents (at most "
                f"{L} tokens from each, held-out documents at most half of its {total:,} tokens)"
            )
    return stats


def _refuse_output_in_input(out: Path, corpus: Path) -> None:
    """The output may not sit inside the input folder: the next prepare would read the
    prepared data (its manifest.json, its .bin files) as a domain of the corpus."""
    if not corpus.is_dir():
        return
    if out.resolve().is_relative_to(corpus.resolve()):
        raise DDKError(
            f"output '{out}' is inside the input corpus '{corpus}', so a later prepare would "
            "read it as a domain; choose an output folder outside the corpus"
        )


def prepare(cfg: PrepareSection, tokenizer_name: str, *, progress: bool = True) -> dict:
    """Tokenise `cfg.input` once into `cfg.output`; return the manifest. Atomic: a failure
    leaves no output folder that a later run would trust."""
    if not cfg.input:
        raise DDKError("no input corpus: set prepare.input (or pass --input)")
    if not cfg.output:
        raise DDKError("no output folder: set prepare.output (or pass --output)")
    out = Path(cfg.output).expanduser()
    _refuse_output_in_input(out, Path(cfg.input).expanduser())
    _make_parent(out)
    # One prepare per output, locked before the input is read. The output appears by rename,
    # so the lock file sits next to it (and is removed on release).
    with FolderLock(out, "prepare", path=out.parent / f".{out.name}.ddk.lock"):
        return _prepare_locked(cfg, tokenizer_name, out, progress)


def _prepare_locked(cfg: PrepareSection, tokenizer_name: str, out: Path, progress: bool) -> dict:
    corpus = discover(cfg.input)
    fingerprint = _fingerprint(cfg, corpus, tokenizer_name)
    existing = _check_output(out, fingerprint, cfg.overwrite)
    if existing is not None:
        if progress:
            print(f"'{out}' already holds this corpus prepared; nothing to do.")
        return existing

    tokenizer = load_tokenizer(tokenizer_name)
    domain_plan = autodomains.plan(cfg, corpus, tokenizer_name, progress)  # pass 1 if clustering
    if tokenizer.eos_token_id is None:
        raise DDKError(f"tokenizer '{tokenizer_name}' has no EOS token to separate documents")
    # ids can have gaps: the largest id, not the count, decides the dtype and logits width
    dtype = token_dtype(max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1))
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed prepare
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        manifest = _write_prepared(
            tmp, cfg, corpus, tokenizer, tokenizer_name, domain_plan, progress
        )
        manifest["fingerprint"] = fingerprint
        typed = Manifest.model_validate(manifest)
        write_manifest(tmp, typed)  # also records what `--overwrite` may later replace
        manifest = typed.model_dump(mode="json")
        publish_dir(tmp, out, aside=out.parent / f".{out.name}.old-{os.getpid()}")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise _disk_full(out, corpus, dtype) from None
        raise
    if progress:
        print(summary_table(manifest))
    return manifest


def _write_prepared(tmp, cfg, corpus, tokenizer, tokenizer_name, domain_plan, progress) -> dict:
    """Tokenise and split every domain into `tmp`; the manifest (without its owner record)."""
    started = time.perf_counter()
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    dtype = token_dtype(vocab_size)
    bos = bos_token(tokenizer, cfg.add_bos, tokenizer_name)
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    docs = domain_plan.documents(tmp) if domain_plan else None
    writers, names = _tokenize_all(
        corpus, cfg, encode, tokenizer.eos_token_id, dtype, tmp, progress, docs, bos=bos
    )
    if not writers:
        raise DDKError(f"input '{cfg.input}' holds no non-empty documents")
    if domain_plan is None:  # clusters replace the source folders as domains
        _check_domains_have_documents(corpus, writers)
    domains = {}
    for domain in writers:
        domains[domain] = {
            "folder": names[domain],
            **_split_domain(tmp / names[domain], domain, cfg, dtype),
        }
    manifest = _manifest(cfg, corpus, tokenizer, tokenizer_name, vocab_size, bos, domains)
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    if domain_plan:  # clusters.json, assignments.jsonl: before the owner record lists files
        manifest["auto_domains"] = domain_plan.finish(tmp)
    return manifest


def _manifest(cfg, corpus, tokenizer, tokenizer_name, vocab_size, bos, domains) -> dict:
    """The manifest of a prepared folder (before its fingerprint, owner record and clusters)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ddk_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": None,
        "tokenizer": {
            "name_or_path": tokenizer_name,
            "vocab_size": vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "class": type(tokenizer).__name__,
            "vocab_sha256": vocab_hash(tokenizer),
        },
        "token_dtype": token_dtype(vocab_size).name,
        "seq_len": cfg.seq_len,
        "val_sequences": cfg.val_sequences,
        "test_sequences": cfg.test_sequences or cfg.val_sequences,
        "add_bos": bos is not None,
        "seed": cfg.seed,
        "text_field": cfg.text_field,
        "domain_field": cfg.domain_field,
        "layout": corpus.layout,
        "sources": [
            {"path": str(f.path), "bytes": f.size, "sha256": f.sha256, "domain": f.domain}
            for f in corpus.files
        ],
        "fingerprint": None,
        "domains": domains,
    }


def bos_token(tokenizer, add_bos: bool | None, name: str) -> int | None:
    """The BOS id to start every document with, or None. `add_bos=None` follows the tokenizer:
    BOS when `tokenizer("a")` starts with it (LLaMA-2, TinyLlama), not otherwise (Qwen, GPT-2)."""
    bos = tokenizer.bos_token_id
    if add_bos is None:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        return bos if bos is not None and ids[:1] == [bos] else None
    if add_bos and bos is None:
        raise DDKError(f"prepare.add_bos is true but tokenizer '{name}' has no BOS token")
    return bos if add_bos else None


def _new_domain_folder(domain: str, names: dict[str, str]) -> str:
    folder = _domain_dirname(domain)
    if folder in names.values():
        raise DDKError(f"domains '{domain}' and another map to one folder name '{folder}'")
    return folder


def _domain_bar(domain: str, total: int | None, position: int) -> tqdm:
    return tqdm(
        desc=f"prepare {domain}",
        total=total,
        unit="B",
        unit_scale=True,
        position=position,
        leave=True,
        dynamic_ncols=True,
    )


def _tokenize_all(corpus, cfg, encode, eos, dtype, tmp, progress, docs=None, bos=None):
    writers: dict[str, _DomainWriter] = {}
    names: dict[str, str] = {}
    bars: dict[str, tqdm] = {}
    domain_bytes: dict[str, int] = {}
    read_bytes: dict[str, int] = {}
    for f in corpus.files:
        if f.domain is not None:
            domain_bytes[f.domain] = domain_bytes.get(f.domain, 0) + f.size
    q: queue.Queue = queue.Queue(maxsize=8)
    stop = threading.Event()
    reader = threading.Thread(
        target=_reader_thread, args=(corpus, cfg, cfg.batch_docs, q, stop, docs), daemon=True
    )
    reader.start()
    try:
        while True:
            kind, a, b = q.get()
            if kind == "end":
                break
            if kind == "error":
                raise a
            if kind == "bytes":
                if progress and a in bars:  # a file of a domain folder was read to its end
                    read_bytes[a] = read_bytes.get(a, 0) + b
                    bars[a].n = min(bars[a].total or read_bytes[a], read_bytes[a])
                    bars[a].refresh()
                continue
            domain, (doc_ids, texts) = a, b
            if domain not in writers:
                names[domain] = _new_domain_folder(domain, names)
                writers[domain] = _DomainWriter(tmp / names[domain], dtype)
                if progress:
                    bars[domain] = _domain_bar(domain, domain_bytes.get(domain), len(bars))
            encodings = encode_documents(encode, texts)  # long documents in bounded pieces
            hashes = [text_hash(t) for t in texts]  # for the held-out duplicate check
            writers[domain].append(doc_ids, encodings, eos, hashes, bos)
            if progress:
                bar = bars[domain]
                done = sum(len(t.encode("utf-8")) for t in texts)
                bar.update(done if bar.total is None else min(done, bar.total - bar.n))
    finally:
        stop.set()
        for w in writers.values():
            w.close()
        for bar in bars.values():
            if bar.total:
                bar.n = bar.total
                bar.refresh()
            bar.close()
    reader.join(timeout=5)
    return writers, names


def summary_table(manifest: dict) -> str:
    rows = [
        [
            name,
            d["documents"],
            d["train_tokens"],
            d["train_sequences"],
            f"{d['val_sequences']} ({d['val_documents']})",
            f"{d['test_sequences']} ({d['test_documents']})",
            d["duplicates_dropped"],
        ]
        for name, d in manifest["domains"].items()
    ]
    total = ["total"] + [sum(r[i] for r in rows) for i in (1, 2, 3)]
    total += [
        f"{sum(d['val_sequences'] for d in manifest['domains'].values())}",
        f"{sum(d['test_sequences'] for d in manifest['domains'].values())}",
        sum(r[6] for r in rows),
    ]
    return format_table(
        [
            "domain",
            "documents",
            "train tokens",
            "train sequences",
            "val windows (docs)",
            "test windows (docs)",
            "duplicates dropped",
        ],
        rows + [total],
    )
