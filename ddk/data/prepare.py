"""`ddk prepare`: a multi-domain corpus -> packed token shards, one folder per domain.

Output layout (all arrays little-endian numpy files; `ddk.data.manifest` owns the contract):
    manifest.json                 domains, splits, tokenizer, seq_len, BOS, sources, owner record
    <domain>/train.bin            flat tokens of the training documents (uint16 or uint32)
    <domain>/train_docs.npy       [n, 2] int64: (document id in corpus order, tokens incl. EOS)
    <domain>/val.bin              validation: the first windows * seq_len + 1 tokens of each
                                  held-out document (up to prepare.heldout_windows_per_document
                                  windows of one document each: `ddk.data.split`)
    <domain>/val_docs.npy         [n, 2] int64: (document id, tokens it contributed), draw order
    <domain>/test.bin, test_docs.npy   the same for the test split (reporting only)
    <domain>/heldout_hashes.npy   sorted uint64 text hashes of every validation and test document
A training window i is tokens[i*seq_len : (i+1)*seq_len + 1]; a held-out window never holds a
token of another document. Documents are tokenised once without special tokens, then given BOS
(prepare.add_bos) and EOS. Validation and test are disjoint sets of whole documents, and every
domain's held-out texts are chosen before any training file is written: a text is held out once
in the whole folder, and its copies in any domain's training data are dropped.
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
from ddk.data import autodomains, chat_prepare
from ddk.data.dedup import HASH_DTYPE, text_hash
from ddk.data.longdocs import encode_documents
from ddk.data.manifest import (
    CHAT_FORMAT_VERSION,
    FORMAT,
    MANIFEST,
    TEXT_FORMAT_VERSION,
    Manifest,
    read_manifest,
    write_manifest,
)
from ddk.data.offsets import (
    SPANS_KEY,
    SpanWriter,
    encode_with_ends,
    offsets_tokenizer,
    remove_temporary,
    write_split_spans,
)
from ddk.data.sources import Corpus, discover, iter_documents
from ddk.data.split import (
    DROPPED,
    TRAIN,
    choose_heldout,
    kept_tokens,
    per_document_cap,
    split_codes,
)
from ddk.data.vocab import same_vocabulary, token_dtype, vocab_hash
from ddk.errors import DDKError
from ddk.fileutil import disk_full, human_bytes, publish_dir
from ddk.lock import FolderLock
from ddk.models import load_tokenizer, tokenizer_file_difference
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
    byte_spans: bool = False
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
        self.spans = SpanWriter(self.folder) if self.byte_spans else None

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
        if self.spans is not None:
            self.spans.close()


def _fingerprint(cfg: PrepareSection, corpus: Corpus, tokenizer_name: str, fmt: str) -> dict:
    """What makes two prepared folders the same corpus (cheap: no re-hashing)."""
    return {
        "input": str(Path(cfg.input).expanduser().resolve()),
        "files": [[str(f.path.resolve()), f.size, f.mtime_ns] for f in corpus.files],
        "tokenizer": tokenizer_name,
        "seq_len": cfg.seq_len,
        "val_sequences": cfg.val_sequences,
        "test_sequences": cfg.test_sequences,
        "add_bos": cfg.add_bos,
        "heldout_windows_per_document": cfg.heldout_windows_per_document,
        "format_version": CHAT_FORMAT_VERSION if fmt == "chat" else TEXT_FORMAT_VERSION,
        "seed": cfg.seed,
        "text_field": cfg.text_field,
        "domain_field": cfg.domain_field,
        **autodomains.fingerprint(cfg),
        **chat_prepare.fingerprint(cfg, fmt),
        **({SPANS_KEY: True} if cfg.byte_spans else {}),  # older folders keep their fingerprint
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


def _wanted(cfg: PrepareSection) -> dict[str, int]:
    return {"val": cfg.val_sequences, "test": cfg.test_sequences or cfg.val_sequences}


def _draw_heldout(
    folder: Path, name: str, cfg: PrepareSection, taken: set[int]
) -> dict[str, list[tuple[int, int]]]:
    """Draw one domain's validation and test documents (`ddk.data.split`), never a text that
    `taken` (the texts earlier domains hold out) holds; add the drawn texts to `taken`."""
    lens = np.fromfile(folder / "all_lens.bin", dtype=np.int64)
    hashes = np.fromfile(folder / "all_hash.bin", dtype=HASH_DTYPE)
    total = int(lens.sum())
    wanted = _wanted(cfg)
    rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
    # Held-out documents may take at most half of a domain's tokens: training keeps the rest.
    drawn = choose_heldout(
        lens,
        hashes,
        rng.permutation(len(lens)),
        cfg.seq_len,
        wanted,
        total // 2,
        per_document=cfg.heldout_windows_per_document,
        taken=taken,
    )
    if not drawn["val"] or not drawn["test"]:
        raise _too_little_heldout(name, cfg, lens, hashes, taken)
    taken.update(int(hashes[i]) for docs in drawn.values() for i, _ in docs)
    return drawn


def _too_little_heldout(name: str, cfg, lens: np.ndarray, hashes: np.ndarray, taken) -> DDKError:
    """Why a domain could not give one validation and one test window, in one line."""
    distinct = np.unique(hashes)
    elsewhere = sum(int(h) in taken for h in distinct.tolist())
    if elsewhere and 2 * elsewhere >= len(distinct):
        return DDKError(
            f"domain '{name}': {elsewhere} of its {len(distinct)} distinct texts are held out by "
            "other domains (the same text in two domains), too few remain for its own validation "
            "and test; remove the copies from one of the domains or add text"
        )
    if len(lens) - len(distinct) >= max(len(distinct), 1):  # at least half are copies
        return DDKError(
            f"domain '{name}' has {len(lens)} documents but only {len(distinct)} distinct "
            "text(s) (the rest are exact duplicates after normalising Unicode and whitespace); a "
            "text is held out once and its copies leave training, so validation and test need "
            "distinct documents: remove the duplicates or add text"
        )
    # A cluster is small because many were asked for: say so first.
    fewer = (
        "ask for fewer domains (prepare.auto_domains / split_domains), "
        if cfg.auto_domains is not None or cfg.split_domains is not None
        else ""
    )
    return DDKError(
        f"domain '{name}' has too little text to hold out whole documents for validation "
        f"and test windows of {cfg.seq_len} tokens ({len(lens)} document(s), {int(lens.sum()):,} "
        f"tokens; held-out documents may use at most half of them); {fewer}add text, split its "
        "text into more documents (e.g. JSONL lines) or lower prepare.seq_len"
    )


def _write_splits(
    folder: Path,
    name: str,
    cfg: PrepareSection,
    dtype: np.dtype,
    drawn: dict[str, list[tuple[int, int]]],
    held: np.ndarray,
) -> dict:
    """Write one domain's held-out files (the first windows * seq_len + 1 tokens of each drawn
    document) and its training file (every other document, in order, except copies of a text
    in `held`: the sorted hashes every domain holds out)."""
    lens = np.fromfile(folder / "all_lens.bin", dtype=np.int64)
    ids = np.fromfile(folder / "all_ids.bin", dtype=np.int64)
    hashes = np.fromfile(folder / "all_hash.bin", dtype=HASH_DTYPE)
    total = int(lens.sum())
    L = cfg.seq_len
    tokens = np.memmap(folder / "all.bin", dtype=dtype, mode="r")
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    stats: dict = {"documents": len(lens), "total_tokens": total, "heldout_unused_tokens": 0}
    for split, picked in drawn.items():
        docs = np.array([i for i, _ in picked], dtype=np.int64)
        windows = np.array([n for _, n in picked], dtype=np.int64)
        kept = kept_tokens(windows, lens[docs], L)
        with open(folder / f"{split}.bin", "wb") as fh:
            for i, n in zip(docs.tolist(), kept.tolist()):
                np.asarray(tokens[int(starts[i]) : int(starts[i]) + n]).tofile(fh)
        np.save(folder / f"{split}_docs.npy", np.stack([ids[docs], kept], axis=1))
        if cfg.byte_spans:
            write_split_spans(folder, split, docs, kept, lens)
        stats[f"{split}_documents"] = len(docs)
        stats[f"{split}_tokens"] = int(kept.sum())
        stats[f"{split}_sequences"] = int(windows.sum())
        stats["heldout_unused_tokens"] += int(lens[docs].sum() - kept.sum())
    codes = split_codes(len(lens), hashes, drawn, held)
    train = codes == TRAIN
    _write_train(folder / "train.bin", tokens, starts, lens, train)
    np.save(folder / "train_docs.npy", np.stack([ids[train], lens[train]], axis=1))
    if cfg.byte_spans:
        write_split_spans(folder, "train", np.flatnonzero(train), lens[train], lens)
        remove_temporary(folder)
    np.save(folder / "heldout_hashes.npy", np.unique(hashes[codes > TRAIN]).astype(HASH_DTYPE))
    del tokens
    for tmp in ("all.bin", "all_lens.bin", "all_ids.bin", "all_hash.bin"):
        (folder / tmp).unlink()
    dropped = codes == DROPPED
    stats["train_documents"] = int(train.sum())
    stats["train_tokens"] = int(lens[train].sum())
    stats["train_sequences"] = max(0, (stats["train_tokens"] - 1) // L)
    stats["duplicates_dropped"] = int(dropped.sum())
    stats["duplicate_tokens"] = int(lens[dropped].sum())
    if stats["train_sequences"] == 0:
        raise DDKError(
            f"domain '{name}' keeps too little training text ({stats['train_tokens']:,} tokens "
            f"after holding out validation and test documents and dropping "
            f"{stats['duplicates_dropped']} copy(ies) of held-out texts, of this or other "
            "domains); add text or lower prepare.seq_len"
        )
    _warn_short_heldout(name, cfg, stats)
    return stats


def _write_train(path: Path, tokens, starts: np.ndarray, lens: np.ndarray, train) -> None:
    """The training documents' tokens in corpus order, copied in runs of consecutive training
    documents, not one document at a time."""
    with open(path, "wb") as fh:
        change = np.flatnonzero(np.diff(np.concatenate([[0], train.view(np.int8), [0]])))
        for run_start, run_end in zip(change[::2], change[1::2]):
            lo = int(starts[run_start])
            hi = int(starts[run_end - 1] + lens[run_end - 1])
            for a in range(lo, hi, _COPY_CHUNK):
                np.asarray(tokens[a : min(hi, a + _COPY_CHUNK)]).tofile(fh)


def _warn_short_heldout(name: str, cfg: PrepareSection, stats: dict) -> None:
    """One warning per held-out split that got fewer windows than asked for."""
    wanted = _wanted(cfg)
    for split, label in (("val", "validation"), ("test", "test")):
        if stats[f"{split}_sequences"] < wanted[split]:
            _warn(
                f"domain '{name}': {label} has {stats[f'{split}_sequences']} of "
                f"{wanted[split]} windows, from {stats[f'{split}_documents']} documents (at most "
                f"{per_document_cap(wanted[split], cfg.heldout_windows_per_document)} window(s) of "
                f"{cfg.seq_len} tokens from each, held-out "
                f"documents at most half of its {stats['total_tokens']:,} tokens)"
            )


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


def prepare(
    cfg: PrepareSection,
    tokenizer_name: str,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict:
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
        return _prepare_locked(cfg, tokenizer_name, out, progress, trust_remote_code)


def _prepare_locked(
    cfg: PrepareSection, tokenizer_name: str, out: Path, progress: bool, trust_remote_code: bool
) -> dict:
    corpus = discover(cfg.input)
    fmt = chat_prepare.detect_format(cfg, corpus)
    if fmt == "chat" and (cfg.auto_domains is not None or cfg.split_domains is not None):
        raise DDKError("chat data takes its domains from folders or a field, not auto_domains")
    if fmt == "chat" and cfg.exclude_heldout:
        raise DDKError("prepare.exclude_heldout is not supported for chat data yet; unset it")
    if fmt == "chat" and cfg.byte_spans:  # a cross-tokenizer teacher re-tokenises raw text
        raise DDKError("prepare.byte_spans is not supported for chat data yet; unset it")
    fingerprint = _fingerprint(cfg, corpus, tokenizer_name, fmt)
    existing = _check_output(out, fingerprint, cfg.overwrite)
    if existing is not None:
        if progress:
            print(f"'{out}' already holds this corpus prepared; nothing to do.")
        return existing

    tokenizer = load_tokenizer(tokenizer_name, trust_remote_code)
    differs = tokenizer_file_difference(tokenizer, tokenizer_name)
    if differs:  # the data would be cut otherwise than the model was trained with
        _warn(f"prepare tokenizer: {differs}")
    domain_plan = autodomains.plan(
        cfg, corpus, tokenizer_name, progress, trust_remote_code
    )  # pass 1 if clustering
    if tokenizer.eos_token_id is None:
        raise DDKError(f"tokenizer '{tokenizer_name}' has no EOS token to separate documents")
    # ids can have gaps: the largest id, not the count, decides the dtype and logits width
    dtype = token_dtype(max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1))
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed prepare
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        if fmt == "chat":
            manifest = _write_chat(tmp, cfg, corpus, tokenizer, tokenizer_name)
        else:
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


def _write_chat(tmp, cfg, corpus, tokenizer, tokenizer_name) -> dict:
    """Chat data (`ddk.data.chat_prepare`) into `tmp`; the manifest, as `_write_prepared`."""
    started = time.perf_counter()
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    domains, chat = chat_prepare.write_chat(
        tmp, cfg, corpus, tokenizer, tokenizer_name, _new_domain_folder
    )
    manifest = _manifest(cfg, corpus, tokenizer, tokenizer_name, vocab_size, None, domains)
    manifest.update(chat=chat, heldout_windows_per_document=1)
    manifest["seconds"] = round(time.perf_counter() - started, 3)
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
    if cfg.byte_spans:  # ids and offsets from one encode (`ddk.data.offsets`)
        encode = offsets_tokenizer(backend)
    writers, names = _tokenize_all(
        corpus, cfg, encode, tokenizer.eos_token_id, dtype, tmp, progress, docs, bos=bos
    )
    if not writers:
        raise DDKError(f"input '{cfg.input}' holds no non-empty documents")
    if domain_plan is None:  # clusters replace the source folders as domains
        _check_domains_have_documents(corpus, writers)
    # Every domain's held-out texts are known before any train.bin is written, so no
    # held-out text stays in the training data of any domain.
    taken: set[int] = set()
    drawn = {d: _draw_heldout(tmp / names[d], d, cfg, taken) for d in writers}
    held = np.array(sorted(taken), dtype=HASH_DTYPE)
    domains = {
        d: {"folder": names[d], **_write_splits(tmp / names[d], d, cfg, dtype, drawn[d], held)}
        for d in writers
    }
    manifest = _manifest(cfg, corpus, tokenizer, tokenizer_name, vocab_size, bos, domains)
    if cfg.byte_spans:
        manifest[SPANS_KEY] = True
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    if domain_plan:  # clusters.json, assignments.jsonl: before the owner record lists files
        manifest["auto_domains"] = domain_plan.finish(tmp)
    return manifest


def _manifest(cfg, corpus, tokenizer, tokenizer_name, vocab_size, bos, domains) -> dict:
    """The manifest of a prepared folder (before its fingerprint, owner record and clusters)."""
    return {
        "format": FORMAT,
        "format_version": TEXT_FORMAT_VERSION,
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
        "heldout_windows_per_document": cfg.heldout_windows_per_document,
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
                writers[domain] = _DomainWriter(tmp / names[domain], dtype, cfg.byte_spans)
                if progress:
                    bars[domain] = _domain_bar(domain, domain_bytes.get(domain), len(bars))
            encodings = _encode(encode, texts, writers[domain], bos is not None)
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


def _encode(encode, texts: list[str], writer: _DomainWriter, bos: bool) -> list:
    """Token ids per document, long documents in bounded pieces; with byte spans, `encode` is
    an offsets tokenizer and the spans go to the writer's `SpanWriter`."""
    if writer.spans is None:
        return encode_documents(encode, texts)
    encodings, ends = encode_with_ends(encode, texts)
    writer.spans.append(texts, ends, bos)
    return encodings


def summary_table(manifest: dict) -> str:
    """Per domain: documents, training tokens and windows, held-out windows (documents), the
    copies of held-out texts dropped, and the share of its tokens no split keeps."""
    domains = list(manifest["domains"].items())

    def unused(docs: list[dict]) -> str:
        """Tokens of held-out documents beyond their windows, as a share of all tokens."""
        if any(d.get("heldout_unused_tokens") is None for d in docs):
            return "-"  # data prepared before format 3 does not record it
        total = sum(d["total_tokens"] for d in docs)
        return f"{100 * sum(d['heldout_unused_tokens'] for d in docs) / max(total, 1):.1f}%"

    def row(name: str, docs: list[dict]) -> list:
        def total(key: str) -> int:
            return sum(d[key] for d in docs)

        return [
            name,
            total("documents"),
            total("train_tokens"),
            total("train_sequences"),
            f"{total('val_sequences')} ({total('val_documents')})",
            f"{total('test_sequences')} ({total('test_documents')})",
            total("duplicates_dropped"),
            unused(docs),
        ]

    rows = [row(name, [d]) for name, d in domains]
    rows.append(row("total", [d for _, d in domains]))
    table = format_table(
        [
            "domain",
            "documents",
            "train tokens",
            "train windows",
            "val windows (docs)",
            "test windows (docs)",
            "copies dropped",
            "unused",
        ],
        rows,
    )
    most = manifest.get("heldout_windows_per_document") or 1
    caps = {
        split: per_document_cap(manifest[f"{split}_sequences"] or manifest["val_sequences"], most)
        for split in ("val", "test")
    }
    cap = (
        str(caps["val"])
        if caps["val"] == caps["test"]
        else f"{caps['val']} (val), {caps['test']} (test)"
    )
    return (
        f"{table}\n"
        f"held-out windows: up to {manifest['seq_len']} targets of one document, at most {cap} per "
        "document; unused: tokens of held-out documents past their windows\n"
        "copies dropped: training documents whose text this or another domain holds out"
    )
