"""What a teacher with another tokenizer reads: each student window re-tokenised from its text.

The student's window comes with its text and its tokens' byte ends (`ddk.data.offsets`).
Runs of text tokens between specials are encoded by the teacher's tokenizer (no special
tokens), and each student BOS/EOS becomes the teacher's own (a teacher without BOS gets its
EOS, as GPT-2-style models start documents). Both sides then carry byte ends and kinds for
`ddk.teacher.alignment`.

`shared_vocabulary` pairs the token strings two vocabularies share (by their bytes), plus
BOS and EOS by role: the exact-KL part of `ddk.losses.crosstok` compares those.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from ddk.data.manifest import SPLITS
from ddk.data.offsets import encode_with_ends, offsets_tokenizer
from ddk.teacher.alignment import BOS, EOS, TEXT, Tokens


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_types(tokenizer) -> set[str]:
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder])
    return {p.get("type") for p in parts if isinstance(p, dict)}


def token_bytes(tokenizer) -> dict[int, bytes]:
    """The bytes each non-special token id stands for (byte-level BPE: GPT-2's alphabet;
    SentencePiece style: '▁' is a space and <0xNN> a byte)."""
    special = set(tokenizer.all_special_ids)
    byte_level = "ByteLevel" in _decoder_types(tokenizer)
    table = _unicode_to_byte()
    out = {}
    for token, i in tokenizer.get_vocab().items():
        if i in special:
            continue
        if byte_level:
            if all(c in table for c in token):
                out[i] = bytes(table[c] for c in token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out[i] = bytes([int(token[3:5], 16)])
        else:
            out[i] = token.replace("▁", " ").encode("utf-8")
    return out


def shared_vocabulary(student, teacher) -> tuple[np.ndarray, np.ndarray]:
    """(student ids, teacher ids) of the token strings both tokenizers hold, one-to-one, plus
    EOS with EOS and BOS with BOS (or the teacher's EOS standing in for its missing BOS)."""
    by_bytes: dict[bytes, int] = {}
    for i, b in sorted(token_bytes(teacher).items()):
        by_bytes.setdefault(b, i)
    pairs = {}
    for i, b in sorted(token_bytes(student).items()):
        if b in by_bytes and by_bytes[b] not in pairs.values():
            pairs[i] = by_bytes[b]
    pairs[student.eos_token_id] = teacher.eos_token_id
    if student.bos_token_id is not None and student.bos_token_id != student.eos_token_id:
        pairs[student.bos_token_id] = _teacher_bos(teacher)
    s_ids = np.fromiter(pairs, dtype=np.int64)
    t_ids = np.fromiter(pairs.values(), dtype=np.int64)
    return s_ids, t_ids


def _teacher_bos(teacher) -> int:
    return teacher.bos_token_id if teacher.bos_token_id is not None else teacher.eos_token_id


CROSS_TEACHERS_ONLINE = (
    "teacher.tokenizer: cross with model.teachers runs online only (teacher.mode: online); "
    "for an offline cache or a server, map every domain to model.teacher"
)


def several_cross_teachers(cfg) -> bool:
    """`teacher.tokenizer: cross` with `model.teachers` naming a teacher besides model.teacher."""
    others = set(cfg.model.teachers.values()) - {cfg.model.teacher}
    return cfg.teacher.tokenizer == "cross" and bool(others)


def cross_tokenizer_problems(cfg, manifest, tokenizers: dict) -> list[str]:
    """Preflight of `teacher.tokenizer: cross` (before any weights load): online or offline
    mode (the cache's own checks: `ddk.teacher.offline`; a teacher per domain: online only),
    data with byte spans, and teacher tokenizers that give back the data's text (a sample of
    every domain's and split's text, `text_file_problem`). `tokenizers`: {role: tokenizer},
    roles "teacher" and "teachers.DOMAIN" (each other teacher of model.teachers)."""
    if several_cross_teachers(cfg) and cfg.teacher.mode != "online":
        return [CROSS_TEACHERS_ONLINE]
    if cfg.teacher.mode == "served":
        return [
            "teacher.tokenizer: 'cross' needs teacher.mode 'online' or 'offline' (a server "
            "scores the student's token ids, not the teacher's)"
        ]
    if cfg.teacher.mode == "offline" and cfg.distill.cross_mismatch == "merge":
        return [
            "distill.cross_mismatch: 'merge' needs teacher.mode 'online' (a cache stores no "
            "span prefixes); use uld or skip offline"
        ]
    if manifest is not None and not (manifest.model_extra or {}).get("byte_spans"):
        return [
            f"data.prepared: '{cfg.data.prepared}' has no byte spans, which a teacher with "
            "another tokenizer reads its text from; prepare it again with prepare.byte_spans: true"
        ]
    if manifest is None:
        return []
    teachers = {r: t for r, t in tokenizers.items() if r == "teacher" or r.startswith("teachers.")}
    for role, tokenizer in teachers.items():
        if (problem := _text_problem(cfg, manifest, role, tokenizer)) is not None:
            return [problem]
    return []


def _text_problem(cfg, manifest, role: str, teacher) -> str | None:
    """Where teacher `role`'s tokenizer first fails to give back its domains' text, or None.
    model.teacher reads every domain (its perplexities too, when it is the only teacher)."""
    mine = [d for d in manifest.domains if not cfg.data.domains or d in cfg.data.domains]
    if role != "teacher" or cfg.model.teachers:
        name = cfg.model.teacher if role == "teacher" else cfg.model.teachers[role[9:]]
        mine = [d for d in mine if cfg.model.teacher_of(d) == name]
    for domain in mine:
        for split in SPLITS:  # training text too: the teacher reads it at every step
            path = Path(cfg.data.prepared).expanduser() / manifest.domains[domain].folder
            path = path / f"{split}_text.bin"
            found = text_file_problem(teacher, path) if path.is_file() else None
            if found is not None:
                at, text, back = found
                return (
                    f"model.{role}: its tokenizer does not give the data's text back (domain "
                    f"'{domain}', {split} text: it first differs at character {at}: "
                    f"{text!r} comes back as {back!r}); a teacher with another tokenizer must "
                    "decode to the same text"
                )
    return None


def text_file_problem(tokenizer, path: Path, pieces: int = 8, piece_bytes: int = 1 << 16):
    """(character offset in the file, its text there, what comes back) where `tokenizer` first
    fails to give back a split's text (`<split>_text.bin`), or None. Checks up to `pieces`
    slices of `piece_bytes`, spread evenly over the file (all of a small file), each cut at
    character boundaries: a tokenizer that normalises a rare character is found where it
    occurs in the sampled text, not only in the first held-out documents."""
    data = (
        np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    )
    n = len(data)
    starts = np.linspace(0, max(n - piece_bytes, 0), num=pieces).astype(np.int64)
    for start in sorted(set(starts.tolist())):
        lo = _char_start(data, start)
        while lo < n and int(data[lo]) in _SPACES:  # a decoder may drop a leading space (Metaspace)
            lo += 1
        hi = _char_start(data, min(start + piece_bytes, n))
        text = bytes(data[lo:hi]).decode("utf-8", errors="replace")
        at = decode_problem(tokenizer, text)
        if at is not None:
            back = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
            chars_before = int(np.count_nonzero((data[:lo] & 0xC0) != 0x80))
            return chars_before + at, text[at : at + 10], back[at : at + 10]
    return None


_SPACES = frozenset(b" \t\r\n")


def _char_start(data: np.ndarray, i: int) -> int:
    """The first UTF-8 character boundary at or after byte `i`."""
    while i < len(data) and (int(data[i]) & 0xC0) == 0x80:
        i += 1
    return i


def decode_problem(tokenizer, text: str) -> int | None:
    """The first character offset at which `tokenizer` fails to give `text` back (encode,
    then decode), or None when it round-trips exactly."""
    back = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
    if back == text:
        return None
    return next(
        (i for i, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back))
    )


class Retokenizer:
    """Re-tokenises student windows for one teacher tokenizer (module doc)."""

    def __init__(self, teacher_tokenizer, student_bos: int | None, student_eos: int):
        self.encoder = offsets_tokenizer(teacher_tokenizer.backend_tokenizer)
        self.bos = _teacher_bos(teacher_tokenizer)
        self.eos = teacher_tokenizer.eos_token_id
        self.student_bos, self.student_eos = student_bos, student_eos

    def student_tokens(self, ids: np.ndarray, ends: np.ndarray) -> Tokens:
        kinds = np.full(len(ids), TEXT, dtype=np.int8)
        if self.student_bos is not None:
            kinds[ids == self.student_bos] = BOS
        kinds[ids == self.student_eos] = EOS
        return Tokens(np.asarray(ends, dtype=np.int64), kinds)

    def window(self, text: bytes, student: Tokens) -> tuple[np.ndarray, Tokens]:
        """The teacher's ids and tokens for a student window (its text and tokens)."""
        ids, ends, kinds = [], [], []
        start, n = 0, len(student.ends)
        for i in range(n + 1):
            special = i < n and student.kinds[i] != TEXT
            if (i == n or special) and i > start:  # a run of text tokens ends
                lo = int(student.ends[start - 1]) if start else 0
                hi = int(student.ends[i - 1])
                if hi > lo:
                    t_ids, t_ends = encode_with_ends(self.encoder, [text[lo:hi].decode("utf-8")])
                    ids.append(t_ids[0])
                    ends.append(t_ends[0] + lo)
                    kinds.append(np.full(len(t_ids[0]), TEXT, dtype=np.int8))
            if special:
                kind = int(student.kinds[i])
                ids.append(np.asarray([self.bos if kind == BOS else self.eos], dtype=np.int64))
                ends.append(np.asarray([student.ends[i]], dtype=np.int64))
                kinds.append(np.asarray([kind], dtype=np.int8))
                start = i + 1
        if not ids:
            return np.zeros(0, dtype=np.int64), Tokens(np.zeros(0, np.int64), np.zeros(0, np.int8))
        return np.concatenate(ids), Tokens(np.concatenate(ends), np.concatenate(kinds))
