"""Which vocabulary prepared data was tokenised with, and the token dtype it is stored in."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ddk.data.manifest import Manifest


def vocab_hash(tokenizer) -> str:
    """Identifies a vocabulary (token -> id), so data and models can be checked against it."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def same_vocabulary(manifest: Manifest, tokenizer) -> bool:
    """Whether prepared data was tokenised with `tokenizer`'s vocabulary (True when the
    manifest predates vocabulary hashes and cannot tell)."""
    recorded = manifest.tokenizer.vocab_sha256
    return not recorded or vocab_hash(tokenizer) == recorded


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
