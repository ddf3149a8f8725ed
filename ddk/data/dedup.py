"""Exact-duplicate detection across the train / held-out splits of every domain: a hash of
normalised text.

Normalisation: Unicode NFC, whitespace runs collapsed to one space, ends stripped. Two documents
that differ only in spacing or Unicode composition are the same document for the split.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

_WHITESPACE = re.compile(r"\s+")
HASH_DTYPE = np.dtype("<u8")


def normalise_text(text: str) -> str:
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def text_hash(text: str) -> int:
    """64-bit hash of the normalised text (the first 8 bytes of its BLAKE2b digest)."""
    digest = hashlib.blake2b(normalise_text(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")
