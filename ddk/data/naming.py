"""Names for clusters of documents: what a user reads in the prepared folder and the report.

A name is `c<index>_<what>`: `c2_code_tcl` for code (language guessed from keywords and
layout), `c3_han` when the cluster's letters are mostly of one non-Latin script, else the words
most distinctive of the cluster (`c0_answer_is_what`), else its kind of characters
(`c5_numbers`). The index keeps names unique; `<what>` is never empty.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

import numpy as np

_TERM_CHARS = 12
_SCRIPT_SAMPLE_CHARS = 20000  # letters counted per cluster to find its script
_CODE_SAMPLE_LINES = 4000
_CODE_LINE_CHARS = 200  # longer lines are cut: the patterns need only a line's ends
# A cluster is code when this share of its non-blank lines looks like code (ends in ; { } ( ) [
# ] : = \, or is a comment, or is indented), and one language's own patterns match this share.
_CODE_LINE_SHARE = 0.3
_LANGUAGE_SHARE = 0.1
_CODE_LINE = re.compile(r"[;{}()\[\]:=\\]\s*$|^\s*(#|//|--|/\*|\*)|^(\t| {2,})\S")

# Patterns a language's lines have and other languages' (and prose) rarely do. A line counts
# once per language; the language matching most lines wins.
LANGUAGE_PATTERNS: dict[str, tuple[str, ...]] = {
    "python": (
        r"^\s*(async\s+)?def \w+\(.*\)(\s*->.*)?:\s*$",
        r"^\s*class \w+(\(.*\))?:\s*$",
        r"^\s*(from [\w.]+ import |import [\w.]+(\s+as \w+)?\s*$)",
        r"^\s*(elif|except|finally|try|else|with|for|while|if)\b.*:\s*$",
        r"\bself\.\w",
        r"^\s*@\w[\w.]*",
    ),
    "c": (
        r"^\s*#\s*(include|define|ifn?def|endif|undef|pragma|if|elif|else)\b",
        r"^\s*(static|extern|typedef|struct|union|enum|const|unsigned|void)\b.*[;{(]\s*$",
        r"\b(int|char|void|size_t|long)\s*\*+\s*\w+",
        r"^\s*(return\b.*|break|continue);\s*$",
        r"\w+->\w+",
    ),
    "cpp": (
        r"\bstd::\w",
        r"^\s*template\s*<",
        r"^\s*namespace \w+\s*\{",
        r"^\s*(public|private|protected):\s*$",
        r"^\s*#include\s*<\w+>\s*$",
    ),
    "java": (
        r"^\s*(public|private|protected)\s+(static\s+)?(final\s+)?[\w<>\[\],]+\s+\w+\s*\(",
        r"^\s*(import|package)\s+[\w.*]+;\s*$",
        r"\bSystem\.(out|err)\.",
        r"^\s*@Override\b",
    ),
    "javascript": (
        r"^\s*(const|let|var)\s+\w+\s*=",
        r"=>\s*[{(]?",
        r"\bfunction\s*\w*\s*\([^)]*\)\s*\{",
        r"\bconsole\.\w+\(",
        r"^\s*(export|import)\s.*\bfrom\s+['\"]",
    ),
    "go": (
        r"^\s*func\s",
        r"^\s*package\s+\w+\s*$",
        r"\w+\s*:=\s*",
        r"\bfmt\.\w+\(",
    ),
    "rust": (
        r"^\s*(pub\s+)?fn\s+\w+",
        r"\blet\s+mut\b",
        r"^\s*(impl|use\s+\w+::|mod\s+\w+;|#\[)",
        r"\w+!\(",
    ),
    "ruby": (
        r"^\s*def \w+[?!]?(\(.*\))?\s*$",
        r"^\s*(require|require_relative|attr_accessor|module)\s",
        r"\bdo(\s*\|[\w, ]+\|)?\s*$",
        r"^\s*puts\s",
    ),
    "lua": (
        r"^\s*local\s+(function\s+)?\w+",
        r"^\s*(local\s+)?function\s+[\w.:]+\s*\(",
        r"^\s*end[\s,)]*$",
        r"\bthen\s*$",
        r"^\s*--",
        r"\belseif\b|~=|\bnil\b",
    ),
    "tcl": (
        r"^\s*proc\s+[\w:]+\s+\{",
        r"^\s*(set|lappend|incr|variable|global|upvar|uplevel|unset)\s+[\w:$(]",
        r"^\s*(namespace\s+(eval|export|import)|package\s+(require|provide))\b",
        r"\[(expr|llength|lindex|string|info|list|set|file)\s",
        r"^\s*(foreach|switch|while|if)\s.*\{\s*$",
    ),
    "shell": (
        r"^#!.*\b(ba|z|k|da)?sh\b",
        r"^\s*(fi|esac|done)\s*;?\s*$",
        r"^\s*(if|elif|while)\s+\[",
        r"^\s*(echo|export|source|exit)\s",
        r"\$\(|\$\{\w+",
    ),
    "perl": (
        r"^\s*my\s+[$@%]\w",
        r"^\s*use\s+(strict|warnings)\s*;",
        r"=~\s*[ms]?/",
        r"^\s*sub\s+\w+\s*\{",
    ),
    "php": (r"<\?php", r"\$this->", r"^\s*(public\s+)?function\s+\w+\s*\(.*\)\s*\{?\s*$"),
    "sql": (
        r"(?i)^\s*(select|insert\s+into|update|delete\s+from|create\s+(table|index|view)|"
        r"alter\s+table|drop\s+table)\b",
        r"(?i)^\s*(from|where|join|group\s+by|order\s+by|values|left\s+join)\b",
    ),
    "html": (r"</?(html|head|body|div|span|p|a|ul|li|table|tr|td|script|meta|link)\b[^>]*>",),
    "css": (
        r"^\s*[.#]?[\w-]+[\w\s,>+~.#:-]*\{\s*$",
        r"^\s*[\w-]+\s*:\s*[^;]+;\s*$",
    ),
}
_COMPILED = {lang: [re.compile(p) for p in pats] for lang, pats in LANGUAGE_PATTERNS.items()}

# Unicode name prefixes -> the script a name uses (first word of the character's name).
_SCRIPT_ALIASES = {"cjk": "han", "hiragana": "kana", "katakana": "kana", "halfwidth": "kana"}


def _ascii_term(term: str) -> str:
    # Accents decomposed first: "über" names as "uber", not the misleading "ber".
    flat = unicodedata.normalize("NFKD", term.lower()).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]", "", flat)[:_TERM_CHARS]


def cluster_name(index: int, terms: list[str]) -> str:
    """`c3_def_return_self`: folder-safe ASCII, unique through the index; terms without an
    ASCII form are left out."""
    parts = [_ascii_term(t) for t in terms]
    return "_".join([f"c{index}"] + [p for p in parts if p])


def distinctive_terms(weights: np.ndarray, vocab: list[str], top: int) -> list[list[str]]:
    """Per row of `weights` ([clusters, terms], mean TF-IDF of each cluster), the terms whose
    weight most exceeds their mean weight in the other clusters (only positive margins)."""
    k = weights.shape[0]
    others = (weights.sum(0, keepdims=True) - weights) / max(k - 1, 1)
    margin = weights - others
    out = []
    for row in margin:
        order = np.argsort(-row, kind="stable")[:top]
        out.append([vocab[i] for i in order if row[i] > 0])
    return out


def script_of(char: str) -> str:
    """'latin', 'han', 'cyrillic', 'arabic', 'greek', 'kana', 'hangul', ... for a letter."""
    if char.isascii():
        return "latin"
    word = unicodedata.name(char, "unknown").split()[0].lower()
    return _SCRIPT_ALIASES.get(word, word)


def dominant_script(texts: list[str]) -> str | None:
    """The script of most letters in `texts` (the first ~20,000 letters), or None when they
    are mostly Latin or there are none."""
    counts: Counter[str] = Counter()
    seen = 0
    for text in texts:
        for ch in text:
            if ch.isalpha():
                counts[script_of(ch)] += 1
                seen += 1
        if seen >= _SCRIPT_SAMPLE_CHARS:
            break
    if not counts:
        return None
    script, n = counts.most_common(1)[0]
    return script if script != "latin" and n > seen / 2 else None


def _ends(line: str) -> str:
    """A long line's start and end (a data row of 10,000 characters costs no more)."""
    half = _CODE_LINE_CHARS // 2
    return line if len(line) <= _CODE_LINE_CHARS else line[:half] + line[-half:]


def code_language(texts: list[str]) -> str | None:
    """The programming language `texts` are written in, or None when they do not look like
    code: see _CODE_LINE_SHARE and LANGUAGE_PATTERNS."""
    lines = [_ends(line) for text in texts for line in text.split("\n") if line.strip()]
    lines = lines[:_CODE_SAMPLE_LINES]
    if not lines:
        return None
    if sum(bool(_CODE_LINE.search(line)) for line in lines) < _CODE_LINE_SHARE * len(lines):
        return None
    hits = {
        lang: sum(any(p.search(line) for p in pats) for line in lines)
        for lang, pats in _COMPILED.items()
    }
    # C++ is C plus its own patterns: call it C++ only when those are common too.
    if hits["cpp"] >= _LANGUAGE_SHARE * len(lines):
        hits["cpp"] += hits["c"]
    lang = max(hits, key=lambda k: (hits[k], k))
    return lang if hits[lang] >= _LANGUAGE_SHARE * len(lines) else None


def _kind_of_characters(texts: list[str]) -> str:
    """For a cluster without words: 'numbers' when digits dominate its non-space characters,
    else 'symbols' (or 'empty')."""
    chars = "".join(texts)[:_SCRIPT_SAMPLE_CHARS]
    visible = [c for c in chars if not c.isspace()]
    if not visible:
        return "empty"
    digits = sum(c.isdigit() for c in visible)
    return "numbers" if digits >= len(visible) / 2 else "symbols"


def describe(texts: list[str], terms: list[str]) -> tuple[str, dict]:
    """(the part of the name after `c<i>_`, what it is based on) for a cluster whose sampled
    documents are `texts` and whose distinctive words are `terms`."""
    lang = code_language(texts)
    if lang:
        return f"code_{lang}", {"code": lang}
    script = dominant_script(texts)
    words = "_".join(p for p in (_ascii_term(t) for t in terms) if p)
    if script:
        return "_".join(p for p in (script, words) if p), {"script": script}
    if words:
        return words, {"terms": terms}
    kind = _kind_of_characters(texts)
    return kind, {"characters": kind}


def name_clusters(texts_per_cluster: list[list[str]], terms: list[list[str]]) -> tuple:
    """Names `c<i>_<what>` for clusters in index order, and what each is based on. Two code
    clusters in the same language (or two of one script) get their top words added, so the
    names say how they differ."""
    described = [describe(t, w) for t, w in zip(texts_per_cluster, terms)]
    counts = Counter(what for what, _ in described)
    names = []
    for i, ((what, basis), words) in enumerate(zip(described, terms)):
        if counts[what] > 1 and "terms" not in basis:
            extra = "_".join(p for p in (_ascii_term(t) for t in words) if p)
            what = "_".join(p for p in (what, extra) if p)
        names.append(f"c{i}_{what}")
    return names, [basis for _, basis in described]
