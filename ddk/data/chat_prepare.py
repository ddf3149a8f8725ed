"""`ddk prepare` for chat data: conversations -> packed token rows plus a loss mask per split.

Per domain folder (beside what raw text writes; `ddk.data.packing` owns the mask bytes):
    train.bin, train.mask     whole conversations packed into seq_len-token rows (prepare.packing),
                              padding at each row's end, one trailing padding token
    train_docs.npy            [n, 2] int64: (conversation id, tokens) of the training ones
    val.bin/.mask, test.bin/.mask, <split>_docs.npy   held-out conversations, one window each
    heldout_hashes.npy        hashes of the held-out conversations' rendered text
A conversation longer than seq_len tokens is cut to its first seq_len (counted as truncated); one
with no trained token left is skipped with a warning. Held-out conversations are drawn whole
(`ddk.data.split`), and copies of a held-out conversation leave every domain's training data.
Records are read from .jsonl/.json files (one conversation per record).
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jinja2 import TemplateError

from ddk.config import PrepareSection
from ddk.data.chat import (
    ChatRenderer,
    is_chat_record,
    load_template,
    record_messages,
    template_hash,
)
from ddk.data.dedup import HASH_DTYPE, text_hash
from ddk.data.packing import MASK_SUFFIX, TARGET, conversation_bytes, fill_rows, pack_rows
from ddk.data.sources import RECORD_SUFFIXES, Corpus
from ddk.data.split import TRAIN, choose_heldout, split_codes
from ddk.data.vocab import token_dtype
from ddk.errors import DDKError, first_line
from ddk.fileutil import sha256_file


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _records(path: Path) -> Iterator[tuple[object, str]]:
    """(record, where) of a .jsonl file (one per line) or a .json file (an array or one object)."""
    if path.suffix.lower() not in RECORD_SUFFIXES - {".parquet"}:
        raise DDKError(f"{path}: chat data is read from .jsonl or .json files")
    with open(path, "rb") as fh:
        head = fh.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith((b"[", b"{")) and path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DDKError(f"{path}: not valid UTF-8 JSON ({e})") from None
        for i, rec in enumerate(data if isinstance(data, list) else [data]):
            yield rec, f"{path} item {i}"
        return
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:  # json.loads takes UTF-8 bytes (and a byte-order mark) as they are
                    record = json.loads(line.removeprefix(b"\xef\xbb\xbf"))
                except ValueError:  # UnicodeDecodeError included
                    raise DDKError(f"{path} line {number}: not valid UTF-8 JSON") from None
                yield record, f"{path} line {number}"


def detect_format(cfg: PrepareSection, corpus: Corpus) -> str:
    """'text' or 'chat': prepare.format, or with 'auto' whether the first record is a chat one."""
    if cfg.format != "auto":
        return cfg.format
    files = [f for f in corpus.files if f.path.suffix.lower() in (".jsonl", ".json")]
    if corpus.layout == "hf_dataset" or not files:
        return "text"
    try:
        for record, _ in _records(files[0].path):
            return "chat" if is_chat_record(record) else "text"
    except DDKError:  # not JSON records: reading it as text says what is wrong
        return "text"
    return "text"


def _iter_conversations(corpus: Corpus, domain_field: str) -> Iterator[tuple[str, object, str]]:
    """(domain, record, where) in corpus order; a file's sha256 is recorded as it is read."""
    if corpus.layout == "hf_dataset":
        raise DDKError("chat data is read from .jsonl or .json files, not a saved dataset")
    for source in corpus.files:
        source.sha256 = sha256_file(source.path)
        for record, where in _records(source.path):
            domain = source.domain
            if domain is None:
                value = record.get(domain_field) if isinstance(record, dict) else None
                if value is None:
                    raise DDKError(
                        f"{where}: record has no '{domain_field}' field; add it or set "
                        "prepare.domain_field"
                    )
                domain = str(value)
            yield domain, record, where


@dataclass
class Conversations:
    """One domain's rendered conversations (cut to seq_len tokens) and what was left out."""

    ids: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    doc_ids: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    skipped: int = 0
    truncated: int = 0
    truncated_tokens: int = 0

    def add(self, doc_id: int, ids: np.ndarray, mask: np.ndarray, text: str, L: int) -> bool:
        if len(ids) > L:
            self.truncated += 1
            self.truncated_tokens += len(ids) - L
            ids, mask = ids[:L], mask[:L]
        if not (mask & TARGET).any():
            self.skipped += 1
            return False
        self.ids.append(ids)
        self.masks.append(mask)
        self.doc_ids.append(doc_id)
        self.hashes.append(text_hash(text))
        return True

    @property
    def lens(self) -> np.ndarray:
        return np.array([len(i) for i in self.ids], dtype=np.int64)


def render_corpus(corpus: Corpus, cfg: PrepareSection, renderer: ChatRenderer):
    """{domain: Conversations} in corpus order; conversations with no trained token are
    skipped with one warning each (a domain left with none stops)."""
    out: dict[str, Conversations] = {}
    first_skipped: dict[str, str] = {}
    for doc_id, (domain, record, where) in enumerate(_iter_conversations(corpus, cfg.domain_field)):
        messages, tools = record_messages(record, where)
        try:
            r = renderer.render(messages, tools)
        except TemplateError as e:  # the template's raise_exception: a role it does not take
            raise DDKError(
                f"{where}: the chat template cannot render this conversation ({first_line(e)}); "
                "fix the record or give a template that takes it in prepare.chat_template"
            ) from None
        conv = out.setdefault(domain, Conversations())
        if not conv.add(doc_id, r.ids, r.mask, r.text, cfg.seq_len) and conv.skipped == 1:
            first_skipped[domain] = where
    for domain, where in first_skipped.items():
        _warn(
            f"domain '{domain}': skipped {out[domain].skipped} conversation(s) with no "
            f"{cfg.train_on.replace('_', ' ')} tokens within prepare.seq_len={cfg.seq_len} "
            f"(the first: {where})"
        )
    for name in {f.domain for f in corpus.files if f.domain is not None} - set(out):
        out[name] = Conversations()
    for name, conv in out.items():
        if not conv.ids:
            raise DDKError(
                f"domain '{name}' has no conversation with tokens to train on "
                f"(prepare.train_on={cfg.train_on}); add conversations with assistant turns"
            )
    return out


def _draw(conv: Conversations, name: str, cfg: PrepareSection, taken: set[int]):
    """Validation and test conversations (one window each), never a text `taken` holds."""
    lens, hashes = conv.lens, np.array(conv.hashes, dtype=HASH_DTYPE)
    rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
    wanted = {"val": cfg.val_sequences, "test": cfg.test_sequences or cfg.val_sequences}
    drawn = choose_heldout(
        lens, hashes, rng.permutation(len(lens)), cfg.seq_len, wanted, int(lens.sum()) // 2,
        per_document=1, taken=taken,
    )  # fmt: skip
    if not drawn["val"] or not drawn["test"]:
        raise DDKError(
            f"domain '{name}' has too few conversations ({len(lens)}) to hold out whole ones "
            "for validation and test; add conversations"
        )
    taken.update(int(hashes[i]) for docs in drawn.values() for i, _ in docs)
    return drawn


def _write_split(folder: Path, split: str, conv: Conversations, picked: list[int], dtype) -> dict:
    tokens = np.concatenate([conv.ids[i] for i in picked]).astype(dtype)
    masks = np.concatenate([conversation_bytes(conv.masks[i]) for i in picked])
    tokens.tofile(folder / f"{split}.bin")
    masks.tofile(folder / f"{split}{MASK_SUFFIX}")
    lens = np.array([len(conv.ids[i]) for i in picked], dtype=np.int64)
    ids = np.array([conv.doc_ids[i] for i in picked], dtype=np.int64)
    np.save(folder / f"{split}_docs.npy", np.stack([ids, lens], axis=1))
    return {
        f"{split}_documents": len(picked),
        f"{split}_tokens": int(lens.sum()),
        f"{split}_sequences": len(picked),
        f"{split}_target_tokens": int((masks & TARGET).sum()),
    }


def _write_train(folder, conv: Conversations, picked: list[int], cfg, dtype, pad: int) -> dict:
    lens = conv.lens[picked]
    rows = pack_rows(lens, cfg.seq_len, cfg.packing)
    rows = [[picked[i] for i in row] for row in rows]
    tokens, masks = fill_rows(rows, conv.ids, conv.masks, cfg.seq_len, pad, dtype)
    tokens.tofile(folder / "train.bin")
    masks.tofile(folder / f"train{MASK_SUFFIX}")
    order = [i for row in rows for i in row]
    ids = np.array([conv.doc_ids[i] for i in order], dtype=np.int64)
    np.save(folder / "train_docs.npy", np.stack([ids, conv.lens[order]], axis=1))
    return {
        "train_documents": len(order),
        "train_tokens": len(tokens),
        "train_sequences": len(rows),
        "train_target_tokens": int((masks & TARGET).sum()),
        "padding_tokens": len(tokens) - int(lens.sum()),
    }


def _write_domain(folder: Path, conv: Conversations, drawn, held, cfg, dtype, pad) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    hashes = np.array(conv.hashes, dtype=HASH_DTYPE)
    codes = split_codes(len(conv.ids), hashes, drawn, held)
    stats: dict = {"documents": len(conv.ids) + conv.skipped}
    for split, docs in drawn.items():
        stats.update(_write_split(folder, split, conv, [i for i, _ in docs], dtype))
    train = np.flatnonzero(codes == TRAIN).tolist()
    if not train:
        raise DDKError("a domain keeps no training conversation; add conversations")
    stats.update(_write_train(folder, conv, train, cfg, dtype, pad))
    np.save(folder / "heldout_hashes.npy", np.unique(hashes[codes > TRAIN]).astype(HASH_DTYPE))
    dropped = codes < TRAIN
    stats.update(
        duplicates_dropped=int(dropped.sum()),
        duplicate_tokens=int(conv.lens[dropped].sum()),
        total_tokens=int(conv.lens.sum()),
        heldout_unused_tokens=0,
        skipped_conversations=conv.skipped,
        truncated_conversations=conv.truncated,
        truncated_tokens=conv.truncated_tokens,
    )
    return stats


def write_chat(
    tmp: Path, cfg: PrepareSection, corpus: Corpus, tokenizer, tokenizer_name: str,
    folder_name: Callable[[str, dict], str],
) -> tuple[dict, dict]:  # fmt: skip
    """Render, split and pack every domain into `tmp`: (domains for the manifest, chat info)."""
    template = load_template(tokenizer, cfg.chat_template, tokenizer_name)
    renderer = ChatRenderer(tokenizer, template, cfg.train_on)
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    dtype = token_dtype(vocab_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    convs = render_corpus(corpus, cfg, renderer)
    taken: set[int] = set()
    drawn = {d: _draw(c, d, cfg, taken) for d, c in convs.items()}
    held = np.array(sorted(taken), dtype=HASH_DTYPE)
    names: dict[str, str] = {}
    domains = {}
    for d, conv in convs.items():
        names[d] = folder_name(d, names)
        stats = _write_domain(tmp / names[d], conv, drawn[d], held, cfg, dtype, pad)
        domains[d] = {"folder": names[d], **stats}
    info = {
        "template_sha256": template_hash(template),
        "template_source": cfg.chat_template or "tokenizer",
        "spans_from": "generation" if renderer.uses_generation else "prefix",
        "train_on": cfg.train_on,
        "packing": cfg.packing,
        "pad_token_id": int(pad),
        "mask_suffix": MASK_SUFFIX,
    }
    return domains, info


def fingerprint(cfg: PrepareSection, fmt: str) -> dict:
    """What chat settings add to a prepared folder's fingerprint (nothing for raw text)."""
    if fmt != "chat":
        return {}
    template = Path(cfg.chat_template).expanduser() if cfg.chat_template else None
    return {
        "format": "chat",
        "chat_template": template_hash(template.read_text(encoding="utf-8"))
        if template and template.is_file()
        else cfg.chat_template,
        "train_on": cfg.train_on,
        "packing": cfg.packing,
    }
