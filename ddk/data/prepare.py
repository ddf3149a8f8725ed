"""`ddk prepare`: a multi-domain corpus -> packed token shards, one folder per domain.

Output layout (all arrays little-endian numpy files):
    manifest.json                 domains, token counts, tokenizer, seq_len, source hashes, version
    <domain>/train.bin            flat tokens of the training documents (uint16 or uint32)
    <domain>/train_docs.npy       [n, 2] int64: (document id in corpus order, tokens incl. EOS)
    <domain>/val.bin              flat tokens of the held-out documents (whole documents)
    <domain>/val_docs.npy         the same for validation
A training or validation "sequence" i is the window tokens[i*seq_len : (i+1)*seq_len + 1].
Documents are tokenised once, without special tokens, each followed by EOS.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
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
from ddk.data.sources import Corpus, discover, iter_documents
from ddk.errors import DDKError
from ddk.table import format_table

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_COPY_CHUNK = 1 << 24  # tokens copied per step when splitting train/val


def vocab_hash(tokenizer) -> str:
    """Identifies a vocabulary (token -> id), so data and models can be checked against it."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def same_vocabulary(manifest: dict, tokenizer) -> bool:
    """Whether prepared data was tokenised with `tokenizer`'s vocabulary (True when the
    manifest predates vocabulary hashes and cannot tell)."""
    recorded = manifest["tokenizer"].get("vocab_sha256")
    return not recorded or vocab_hash(tokenizer) == recorded


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


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

    def append(self, doc_ids: list[int], encodings: list[list[int]], eos: int) -> None:
        lengths = np.fromiter((len(e) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
        flat = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for ids in encodings:
            n = len(ids)
            flat[pos : pos + n] = ids
            flat[pos + n] = eos
            pos += n + 1
        flat.tofile(self._tokens_fh)
        lengths.tofile(self._lens_fh)
        np.asarray(doc_ids, dtype=np.int64).tofile(self._ids_fh)
        self.documents += len(encodings)
        self.tokens += pos

    def close(self) -> None:
        for fh in (self._tokens_fh, self._lens_fh, self._ids_fh):
            fh.close()


def _fingerprint(cfg: PrepareSection, corpus: Corpus, tokenizer_name: str) -> dict:
    """What makes two prepared folders the same corpus (cheap: no re-hashing)."""
    return {
        "input": str(Path(cfg.input).expanduser().resolve()),
        "files": [[str(f.path.resolve()), f.size, f.mtime_ns] for f in corpus.files],
        "tokenizer": tokenizer_name,
        "seq_len": cfg.seq_len,
        "val_sequences": cfg.val_sequences,
        "seed": cfg.seed,
        "text_field": cfg.text_field,
        "domain_field": cfg.domain_field,
        **autodomains.fingerprint(cfg),
    }


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DDKError(f"'{folder}' is not prepared data (no {MANIFEST}); run `ddk prepare` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DDKError(f"{path} is corrupt (not JSON); prepare the data again") from None


def _check_output(out: Path, fingerprint: dict, overwrite: bool) -> dict | None:
    """Return the existing manifest when `out` already holds this very corpus."""
    if out.exists() and not out.is_dir():
        raise DDKError(f"output '{out}' is a file; choose a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    manifest = None
    if (out / MANIFEST).is_file():
        try:
            manifest = json.loads((out / MANIFEST).read_text())
        except json.JSONDecodeError:
            manifest = None
    if manifest is None:
        # --overwrite replaces prepared data, never a folder of other files.
        raise DDKError(
            f"output '{out}' already holds files that are not ddk prepared data; choose another "
            "output folder"
        )
    if overwrite:
        return None
    if manifest.get("fingerprint") == fingerprint:
        return manifest
    raise DDKError(
        f"output '{out}' already holds a different prepared corpus; choose another output "
        "folder or pass --overwrite"
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


def _split_domain(folder: Path, name: str, cfg: PrepareSection, dtype: np.dtype) -> dict:
    """Hold out whole random documents for validation; the rest, in order, is training data."""
    lens = np.fromfile(folder / "all_lens.bin", dtype=np.int64)
    ids = np.fromfile(folder / "all_ids.bin", dtype=np.int64)
    total = int(lens.sum())
    need = cfg.val_sequences * cfg.seq_len + 1
    if total < 2 * need:
        raise DDKError(
            f"domain '{name}' has {total:,} tokens, too little for a validation set of "
            f"{cfg.val_sequences} x {cfg.seq_len} tokens plus as much training data; add text or "
            "lower prepare.val_sequences / prepare.seq_len"
        )
    rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
    order = rng.permutation(len(lens))
    taken = int(np.searchsorted(np.cumsum(lens[order]), need)) + 1
    is_val = np.zeros(len(lens), dtype=bool)
    is_val[order[:taken]] = True
    if int(lens[~is_val].sum()) < cfg.seq_len + 1:
        raise DDKError(
            f"domain '{name}' has too few documents to hold out whole ones for validation "
            f"({len(lens)} document(s)); split its text into more documents (e.g. JSONL lines) "
            "or lower prepare.val_sequences"
        )
    tokens = np.memmap(folder / "all.bin", dtype=dtype, mode="r")
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    stats = {}
    for split, mask in (("train", ~is_val), ("val", is_val)):
        with open(folder / f"{split}.bin", "wb") as fh:
            # Copy runs of consecutive documents of this split, not one document at a time.
            change = np.flatnonzero(np.diff(np.concatenate([[0], mask.view(np.int8), [0]])))
            for run_start, run_end in zip(change[::2], change[1::2]):
                lo = int(starts[run_start])
                hi = int(starts[run_end - 1] + lens[run_end - 1])
                for a in range(lo, hi, _COPY_CHUNK):
                    np.asarray(tokens[a : min(hi, a + _COPY_CHUNK)]).tofile(fh)
        np.save(folder / f"{split}_docs.npy", np.stack([ids[mask], lens[mask]], axis=1))
        n_tokens = int(lens[mask].sum())
        stats[f"{split}_documents"] = int(mask.sum())
        stats[f"{split}_tokens"] = n_tokens
    del tokens
    for tmp in ("all.bin", "all_lens.bin", "all_ids.bin"):
        (folder / tmp).unlink()
    stats["train_sequences"] = (stats["train_tokens"] - 1) // cfg.seq_len
    stats["val_sequences"] = cfg.val_sequences
    stats["documents"] = stats["train_documents"] + stats["val_documents"]
    return stats


def prepare(cfg: PrepareSection, tokenizer_name: str, *, progress: bool = True) -> dict:
    """Tokenise `cfg.input` once into `cfg.output`; return the manifest. Atomic: a failure
    leaves no output folder that a later run would trust."""
    from ddk.models import load_tokenizer

    if not cfg.input:
        raise DDKError("no input corpus: set prepare.input (or pass --input)")
    if not cfg.output:
        raise DDKError("no output folder: set prepare.output (or pass --output)")
    out = Path(cfg.output).expanduser()
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
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    dtype = token_dtype(vocab_size)
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed prepare
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    started = time.perf_counter()
    try:
        docs = domain_plan.documents(tmp) if domain_plan else None
        writers, names = _tokenize_all(
            corpus, cfg, encode, tokenizer.eos_token_id, dtype, tmp, progress, docs
        )
        if not writers:
            raise DDKError(f"input '{cfg.input}' holds no non-empty documents")
        domains = {}
        for domain in writers:
            domains[domain] = {
                "folder": names[domain],
                **_split_domain(tmp / names[domain], domain, cfg, dtype),
            }
        manifest = {
            "format_version": FORMAT_VERSION,
            "ddk_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - started, 3),
            "tokenizer": {
                "name_or_path": tokenizer_name,
                "vocab_size": vocab_size,
                "eos_token_id": tokenizer.eos_token_id,
                "class": type(tokenizer).__name__,
                "vocab_sha256": vocab_hash(tokenizer),
            },
            "token_dtype": dtype.name,
            "seq_len": cfg.seq_len,
            "val_sequences": cfg.val_sequences,
            "seed": cfg.seed,
            "text_field": cfg.text_field,
            "domain_field": cfg.domain_field,
            "layout": corpus.layout,
            "sources": [
                {"path": str(f.path), "bytes": f.size, "sha256": f.sha256, "domain": f.domain}
                for f in corpus.files
            ],
            "fingerprint": fingerprint,
            "domains": domains,
        }
        if domain_plan:
            manifest["auto_domains"] = domain_plan.finish(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(summary_table(manifest))
    return manifest


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished folder into place; the old one is removed only after the rename."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tokenize_all(corpus, cfg, encode, eos, dtype, tmp, progress, docs=None):
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
                folder = _domain_dirname(domain)
                if folder in names.values():
                    raise DDKError(
                        f"domains '{domain}' and another map to one folder name '{folder}'"
                    )
                names[domain] = folder
                writers[domain] = _DomainWriter(tmp / folder, dtype)
                if progress:
                    total = domain_bytes.get(domain)
                    bars[domain] = tqdm(
                        desc=f"prepare {domain}",
                        total=total,
                        unit="B",
                        unit_scale=True,
                        position=len(bars),
                        leave=True,
                        dynamic_ncols=True,
                    )
            encodings = [e.ids for e in encode(texts, add_special_tokens=False)]
            writers[domain].append(doc_ids, encodings, eos)
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
        [name, d["documents"], d["train_tokens"], d["val_tokens"], d["train_sequences"]]
        for name, d in manifest["domains"].items()
    ]
    total = [
        "total",
        sum(r[1] for r in rows),
        sum(r[2] for r in rows),
        sum(r[3] for r in rows),
        sum(r[4] for r in rows),
    ]
    return format_table(
        ["domain", "documents", "train tokens", "val tokens", "train sequences"], rows + [total]
    )
