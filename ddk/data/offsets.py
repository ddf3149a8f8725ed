"""Byte spans of prepared tokens: the text behind every window, for a teacher with another
tokenizer (`ddk.teacher.crosstok`) and for perplexity per byte.

Written by `ddk prepare` when `prepare.byte_spans` is true, as two ADDITIONAL files per split
beside the token shard (folders without them keep working; the manifest says `byte_spans:
true`):

    <domain>/<split>_text.bin   the UTF-8 text of the split's tokens, in token order (held-out
                                documents: the text of their kept tokens only)
    <domain>/<split>_ends.bin   int64 per token: the byte offset in <split>_text.bin where the
                                token's text ends

A token spans [ends[t-1], ends[t]) (the first token of the split starts at 0), so a window of
tokens [a, b) is the text [ends[a-1], ends[b-1]). BOS and EOS have no text (zero width). A
byte-level tokenizer can cut a multi-byte character between tokens; those tokens are given zero
width and the character's bytes go to the token that completes it, so every non-zero end is a
character boundary where both the student's and any other tokenisation of the text can meet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer  # transformers' fast tokenizers are built on it

from ddk.data.longdocs import PIECE_CHARS, split_at_whitespace
from ddk.errors import DDKError

SPANS_KEY = "byte_spans"  # manifest key: true when every split has its span files
_TMP = ("all_text.bin", "all_ends.bin", "all_textlens.bin")


def offsets_tokenizer(backend):
    """A copy of a `tokenizers.Tokenizer` without its post-processor, whose offsets are the
    model's own (a ByteLevel post-processor can trim spaces out of them); ids are unchanged
    because documents are encoded without special tokens."""
    copy = Tokenizer.from_str(backend.to_str())
    copy.post_processor = None
    return copy


def byte_ends(offsets, text: str) -> np.ndarray:
    """int64 byte end (in `text`'s UTF-8) of each token from its character `offsets`.

    A token whose character span reaches past the next token's start ends inside a character
    (byte-level BPE cutting a multi-byte character): it gets zero width (the end before it),
    and the character's bytes go to the token that completes it."""
    n = len(offsets)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    char_bytes = np.fromiter((len(c.encode("utf-8")) for c in text), np.int64, len(text))
    char_end = np.concatenate([[0], np.cumsum(char_bytes)])
    spans = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
    clean = np.ones(n, dtype=bool)
    clean[:-1] = spans[:-1, 1] <= spans[1:, 0]
    ends = np.where(clean, char_end[spans[:, 1]], 0)
    ends[-1] = char_end[-1]  # the last token completes the text
    return np.maximum.accumulate(ends)


def encode_with_ends(tokenizer, texts: list[str], limit: int = PIECE_CHARS) -> tuple[list, list]:
    """(ids, byte ends) per document, no special tokens; `tokenizer` from `offsets_tokenizer`.
    Long documents are encoded in the same whitespace pieces as `ddk.data.longdocs`."""
    all_ids, all_ends = [], []
    for text in texts:
        pieces = split_at_whitespace(text, limit)
        ids, ends, base = [], [], 0
        for piece, enc in zip(pieces, tokenizer.encode_batch(pieces, add_special_tokens=False)):
            ids.append(np.asarray(enc.ids, dtype=np.int64))
            ends.append(base + byte_ends(enc.offsets, piece))
            base += len(piece.encode("utf-8"))
        all_ids.append(np.concatenate(ids))
        all_ends.append(np.concatenate(ends))
    return all_ids, all_ends


class SpanWriter:
    """Per domain, while tokenising: every document's text and its tokens' ends (relative to
    the document, BOS and EOS included), in the order `_DomainWriter` stores the tokens."""

    def __init__(self, folder: Path):
        self._text = open(folder / "all_text.bin", "ab")
        self._ends = open(folder / "all_ends.bin", "ab")
        self._lens = open(folder / "all_textlens.bin", "ab")

    def append(self, texts: list[str], ends: list[np.ndarray], bos: bool) -> None:
        for text, e in zip(texts, ends):
            data = text.encode("utf-8")
            head = np.zeros(int(bos), dtype=np.int64)
            self._text.write(data)
            self._ends.write(np.concatenate([head, e, [len(data)]]).astype(np.int64))
            self._lens.write(np.asarray([len(data)], dtype=np.int64))

    def close(self) -> None:
        for fh in (self._text, self._ends, self._lens):
            fh.close()


def write_split_spans(folder: Path, split: str, docs: np.ndarray, kept: np.ndarray, lens) -> None:
    """`<split>_text.bin` and `<split>_ends.bin` for documents `docs` (indices into the
    domain's documents, in the split's order), each with its first `kept` tokens; `lens` are
    every document's tokens (what `all_ends.bin` holds per document)."""
    text = np.memmap(folder / "all_text.bin", dtype=np.uint8, mode="r")
    if text.size == 0:  # np.memmap refuses empty files; a domain has text, so never here
        raise DDKError(f"'{folder}' holds no text to record byte spans of")
    ends = np.fromfile(folder / "all_ends.bin", dtype=np.int64)
    text_lens = np.fromfile(folder / "all_textlens.bin", dtype=np.int64)
    text_start = np.concatenate([[0], np.cumsum(text_lens)[:-1]])
    tok_start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    base = 0
    with (
        open(folder / f"{split}_text.bin", "wb") as tf,
        open(folder / f"{split}_ends.bin", "wb") as ef,
    ):
        for i, n in zip(np.asarray(docs).tolist(), np.asarray(kept).tolist()):
            rel = ends[tok_start[i] : tok_start[i] + n]
            used = int(rel[-1]) if n else 0
            tf.write(text[text_start[i] : text_start[i] + used].tobytes())
            ef.write((rel + base).astype(np.int64).tobytes())
            base += used


def remove_temporary(folder: Path) -> None:
    for name in _TMP:
        (folder / name).unlink(missing_ok=True)


class SplitSpans:
    """The byte spans of one domain's split: the text behind any run of its tokens."""

    def __init__(self, folder: Path, split: str, tokens: int):
        self.text_path = folder / f"{split}_text.bin"
        self.ends_path = folder / f"{split}_ends.bin"
        if not self.ends_path.is_file() or self.ends_path.stat().st_size != 8 * tokens:
            raise DDKError(
                f"'{self.ends_path}' is missing or does not match the {split} tokens; prepare "
                "the data again with prepare.byte_spans: true"
            )
        self.ends = np.memmap(self.ends_path, dtype=np.int64, mode="r") if tokens else None
        size = self.text_path.stat().st_size if self.text_path.is_file() else -1
        if tokens and size != int(self.ends[-1]):
            raise DDKError(f"'{self.text_path}' is missing or truncated; prepare the data again")
        self.text = np.memmap(self.text_path, dtype=np.uint8, mode="r") if size > 0 else None

    def window(self, start: int, n: int) -> tuple[bytes, np.ndarray]:
        """(text, ends) of tokens [start, start + n): the UTF-8 text from the first token's
        start to the last one's end, and each token's end relative to that text."""
        first = int(self.ends[start - 1]) if start > 0 else 0
        ends = np.asarray(self.ends[start : start + n], dtype=np.int64) - first
        last = first + (int(ends[-1]) if n else 0)
        data = b"" if self.text is None else self.text[first:last].tobytes()
        return data, ends

    def target_bytes(self, start: int, n: int) -> int:
        """Bytes of the targets of a window of tokens [start, start + n): all but its first."""
        return int(self.ends[start + n - 1] - self.ends[start]) if n > 1 else 0
