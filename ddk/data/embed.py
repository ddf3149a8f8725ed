"""Document features for clustering: one row per text, rows L2-normalised (cosine = dot).

`HashingEmbedder` needs no model. A row joins two blocks of equal weight (`SHAPE_WEIGHT`), each
a unit vector:
- content: hashed character 1-3-grams and words (stateless, so any corpus size), weighted by
  sublinear TF times the square root of the sample's IDF, then a seeded truncated SVD (LSA) to
  100 dimensions. It tells languages and topics apart. Full IDF is the sample's, so on a corpus
  that is 85 % one domain it weighs the words every document of that domain shares near zero
  and the words that tell its templates apart high: the domain splits, and the small domains
  (C, Tcl, English prose: the same comment words) look alike. The square root tempers that.
- shape: the text with every run of letters written `a` (`h` for other scripts), every number
  `0` and every run of spaces ` `, as hashed character 1-4-grams with raw term frequencies (no
  IDF, so no domain sets the weights), SVD to 32 dimensions. `def f(x):` and `proc f {x} {`
  differ; two word problems with different nouns do not. This separates kinds of text (code in
  each language, prose, numbers, records) whatever their share of the corpus.

What the blocks and weights recover is measured by benchmarks/auto_domains.py. `StudentEmbedder`
mean-pools the student's last hidden states over real tokens, batched, on the GPU when there is
one.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
from sklearn.preprocessing import normalize
from transformers import AutoModel

from ddk.errors import DDKError, first_line
from ddk.models import load_tokenizer, resolve_local_path

_HASH_FEATURES = 1 << 16  # per analyzer; collisions only blur rare n-grams
_SHAPE_FEATURES = 1 << 18
_SVD_DIMS = 100
_SHAPE_DIMS = 32
# Weight of the shape block next to the content block (both unit vectors). Lower: the dominant
# domain's templates pull apart again; higher: languages of one script (English and German
# prose share their shape) move together. `python benchmarks/auto_domains.py --cluster-only
# --shape-weights 0.5 1 2` measures both.
SHAPE_WEIGHT = 1.0
_STUDENT_MAX_TOKENS = 256  # a document's start is enough to tell its kind
_SHAPE_RUNS = re.compile(r"[^\W\d_]+|\d+|[ \t]+|.", re.S)


def word_shape(text: str) -> str:
    """`x = f(12, "ab")` -> `a = a(0, "a")`: runs of letters -> `a` (ASCII) or `h` (other
    scripts), numbers -> `0`, runs of spaces and tabs -> one space; everything else is kept."""
    out = []
    for m in _SHAPE_RUNS.finditer(text):
        run = m.group()
        if run[0].isalpha():
            out.append("a" if run.isascii() else "h")
        elif run[0].isdigit():
            out.append("0")
        elif run[0] in " \t":
            out.append(" ")
        else:
            out.append(run)
    return "".join(out)


def _fit_svd(matrix, dims: int, seed: int):
    """A seeded truncated SVD of `matrix`, or None when it has too few rows or columns."""

    dims = min(dims, matrix.shape[0] - 1, matrix.shape[1] - 1)
    if dims < 2:
        return None
    # A block with no variance (every sampled shape alike) divides by zero in sklearn's
    # explained-variance ratio, which nothing here reads: no RuntimeWarning for it.
    with np.errstate(divide="ignore", invalid="ignore"):
        return TruncatedSVD(dims, algorithm="randomized", random_state=seed).fit(matrix)


class HashingEmbedder:
    def __init__(self, seed: int):
        self.seed = seed
        common = dict(n_features=_HASH_FEATURES, alternate_sign=False, norm=None)
        self._char = HashingVectorizer(analyzer="char_wb", ngram_range=(1, 3), **common)
        self._word = HashingVectorizer(analyzer="word", token_pattern=r"(?u)\b\w+\b", **common)
        self._shape = HashingVectorizer(
            analyzer="char",
            ngram_range=(1, 4),
            lowercase=False,
            n_features=_SHAPE_FEATURES,
            alternate_sign=False,
            norm=None,
        )
        self._tfidf = None
        self._svd = self._shape_svd = None
        self._columns = self._shape_columns = None

    def _counts(self, texts: list[str]):
        return sp.hstack([self._char.transform(texts), self._word.transform(texts)]).tocsr()

    def _shape_tf(self, texts: list[str]):
        counts = self._shape.transform([word_shape(t) for t in texts]).tocsr()
        counts.data = 1 + np.log(counts.data)  # sublinear, like the content block's TF
        return normalize(counts)

    def fit(self, texts: list[str]) -> HashingEmbedder:
        counts = self._counts(texts)
        self._tfidf = TfidfTransformer(sublinear_tf=True).fit(counts)
        self._tfidf.idf_ = np.sqrt(self._tfidf.idf_)  # see the module docstring
        # Only features the sample has can carry SVD weight: fit on those columns (much faster).
        self._columns = np.unique(counts.indices)
        self._svd = _fit_svd(self._tfidf.transform(counts)[:, self._columns], _SVD_DIMS, self.seed)
        shapes = self._shape_tf(texts)
        self._shape_columns = np.unique(shapes.indices)
        self._shape_svd = _fit_svd(shapes[:, self._shape_columns], _SHAPE_DIMS, self.seed)
        return self

    def transform(self, texts: list[str]) -> np.ndarray:
        weighted = self._tfidf.transform(self._counts(texts))[:, self._columns]
        content = weighted.toarray() if self._svd is None else self._svd.transform(weighted)
        shapes = self._shape_tf(texts)[:, self._shape_columns]
        shape = shapes.toarray() if self._shape_svd is None else self._shape_svd.transform(shapes)
        rows = np.hstack([normalize(content), SHAPE_WEIGHT * normalize(shape)])
        return normalize(rows).astype(np.float32)


class EmbedModel(NamedTuple):
    """The model `StudentEmbedder` loads, and whether its own code may run (the run's
    model.trust_remote_code, passed explicitly: transformers would otherwise ask on stdin)."""

    name: str | None
    trust_remote_code: bool


class StudentEmbedder:
    def __init__(self, model: EmbedModel, batch_size: int = 32):
        model_name = model.name
        if not model_name:
            raise DDKError(
                "prepare.embedder 'student' needs a model: set model.student or "
                "prepare.embed_model (or pass --tokenizer with a model folder)"
            )
        self.tokenizer = load_tokenizer(model_name, model.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.model = AutoModel.from_pretrained(
                resolve_local_path(model_name, "model"), trust_remote_code=model.trust_remote_code
            )
        except (OSError, ValueError) as e:
            raise DDKError(
                f"cannot load the embedder model '{model_name}': {first_line(e)}"
            ) from None
        self.model.to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or _STUDENT_MAX_TOKENS
        self.max_tokens = min(_STUDENT_MAX_TOKENS, limit)
        self.batch_size = batch_size

    def fit(self, texts: list[str]) -> StudentEmbedder:
        return self

    def transform(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                add_special_tokens=False,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(pooled.cpu().numpy())
        rows = np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size))
        return normalize(rows).astype(np.float32)


def make_embedder(kind: str, seed: int, model: EmbedModel):
    if kind == "student":
        return StudentEmbedder(model)
    return HashingEmbedder(seed)
