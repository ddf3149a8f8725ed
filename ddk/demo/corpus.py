"""An offline multi-domain demo corpus, built from what every Python install contains.

``build_demo_corpus(out_dir)`` writes the folder layout ``ddk prepare`` reads::

    out_dir/
      SOURCES.md              where each domain came from
      code/part-00000.jsonl   one JSON object per line: {"text": "..."}
      prose/part-00000.jsonl
      math/part-00000.jsonl
      records/part-00000.jsonl

Domains, of clearly different nature and deliberately unequal size (at ``scale=1.0``):

* ``code`` (~3 MB): Python source of the standard library, one document per file or per
  chunk of consecutive top-level statements (functions, classes, ...) of at most ~4 KB.
* ``prose`` (~1.5 MB): English technical prose: the interactive-help texts of
  ``pydoc_data.topics`` and module/class/function docstrings read with ``ast`` (no module
  is imported, so nothing runs).
* ``math`` (~0.6 MB): generated arithmetic word problems with correct worked answers.
* ``records`` (~0.4 MB): generated structured records: JSON objects and CSV tables with
  fixed schemas (people, orders, sensor readings, bank transactions).

No network is needed. The output is deterministic given ``(seed, scale)`` and the Python
version (the stdlib files are the input of the first two domains). The stdlib ``test``
package is never read, so the corpus builds where it is not installed.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import os
import random
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date, datetime, timedelta
from fractions import Fraction
from pathlib import Path

__all__ = [
    "DOMAINS",
    "MAX_DOC_BYTES",
    "SKIP_DIRS",
    "TARGET_BYTES",
    "build_demo_corpus",
    "default_stdlib_dir",
    "math_qa",
    "order_record",
    "person_record",
    "stdlib_python_files",
]

DOMAINS: tuple[str, ...] = ("code", "prose", "math", "records")

#: Bytes of text (UTF-8) per domain at ``scale=1.0``; deliberately unequal, as in real corpora.
TARGET_BYTES: dict[str, int] = {
    "code": 3_000_000,
    "prose": 1_500_000,
    "math": 600_000,
    "records": 400_000,
}

#: Upper bound of one code / prose document (longer files are split).
MAX_DOC_BYTES = 4096

#: Directories of the stdlib that are never read: tests (absent from many installs), IDLE and
#: lib2to3 (tool code and test data, some of it not valid Python 3), third-party packages,
#: byte-code caches, codec tables (``encodings``: generated data, not code) and ``pydoc_data``
#: (already the prose domain). Directories whose name is not a Python identifier (e.g.
#: ``lib-dynload``, ``config-3.x-...``) are skipped as well: they are not packages.
SKIP_DIRS: frozenset[str] = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",
        "pydoc_data",
    }
)

_SKIP_FILE_PREFIXES = ("_sysconfigdata",)  # build-machine specific variable dumps
_FILE_NAME = "part-00000.jsonl"
_PROSE_TOPICS_SHARE = 0.25  # share of the prose domain taken from the pydoc help topics
_MIN_CODE_DOC_BYTES = 40
_MIN_DOCSTRING_CHARS = 160
_MIN_DOCSTRING_WORDS = 25


# --------------------------------------------------------------------------- public API


def build_demo_corpus(
    out_dir: Path,
    *,
    scale: float = 1.0,
    seed: int = 0,
    stdlib_dir: Path | None = None,
) -> dict[str, dict]:
    """Write the demo corpus to ``out_dir`` and return ``{domain: {"documents", "bytes"}}``.

    ``scale`` multiplies every domain's target size (``TARGET_BYTES``); ``bytes`` counts the
    UTF-8 bytes of the documents' text. The two stdlib domains stop early when the stdlib
    has no more text (only at scales well above 1). ``stdlib_dir`` overrides the standard
    library folder that is read (default: :func:`default_stdlib_dir`).

    Only ``out_dir/<domain>/part-00000.jsonl`` and ``out_dir/SOURCES.md`` are (over)written;
    a domain folder that already holds other ``*.jsonl`` files is refused rather than mixed.
    """
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    out_dir = Path(out_dir)
    root = Path(stdlib_dir) if stdlib_dir is not None else default_stdlib_dir()
    targets = {d: max(1, round(TARGET_BYTES[d] * scale)) for d in DOMAINS}

    _refuse_stray_files(out_dir)

    files = stdlib_python_files(root)
    random.Random(f"{seed}:stdlib-order").shuffle(files)
    code_docs, n_code_files = _code_documents(files, targets["code"])
    # Prose prefers docstrings of files the code domain did not use, so the two overlap little.
    prose_files = files[n_code_files:] + files[:n_code_files]
    prose_docs, n_topics = _prose_documents(
        prose_files, targets["prose"], random.Random(f"{seed}:prose")
    )
    docs = {
        "code": code_docs,
        "prose": prose_docs,
        "math": _take(math_problems(random.Random(f"{seed}:math")), targets["math"]),
        "records": _take(record_texts(random.Random(f"{seed}:records")), targets["records"]),
    }

    stats = _write_domains(out_dir, docs, seed, root)
    (out_dir / "SOURCES.md").write_text(
        _sources_md(stats, scale=scale, seed=seed, n_code_files=n_code_files, n_topics=n_topics),
        encoding="utf-8",
    )
    return stats


def _refuse_stray_files(out_dir: Path) -> None:
    for domain in DOMAINS:
        stray = [p.name for p in sorted((out_dir / domain).glob("*.jsonl")) if p.name != _FILE_NAME]
        if stray:
            raise FileExistsError(
                f"{out_dir / domain} already holds other JSONL files ({', '.join(stray)}); "
                "choose an empty output folder"
            )


def _write_domains(out_dir: Path, docs: dict[str, list[str]], seed: int, root: Path) -> dict:
    """Each domain's documents, shuffled, as one JSONL file; {domain: {documents, bytes}}."""
    stats: dict[str, dict] = {}
    for domain in DOMAINS:
        texts = docs[domain]
        if not texts:
            raise RuntimeError(
                f"demo corpus: no {domain!r} documents could be built "
                f"(standard library read from {root}); pass stdlib_dir=..."
            )
        random.Random(f"{seed}:{domain}:order").shuffle(texts)
        write_domain_jsonl(out_dir / domain / _FILE_NAME, texts)
        stats[domain] = {
            "documents": len(texts),
            "bytes": sum(len(t.encode("utf-8")) for t in texts),
        }
    return stats


def default_stdlib_dir() -> Path:
    """The folder holding the pure-Python standard library of the running interpreter."""
    candidate = sysconfig.get_paths().get("stdlib")
    if candidate and (Path(candidate) / "os.py").is_file():
        return Path(candidate)
    return Path(os.__file__).resolve().parent


def stdlib_python_files(root: Path, skip_dirs: Iterable[str] = SKIP_DIRS) -> list[Path]:
    """All ``*.py`` files under ``root`` outside ``skip_dirs``, sorted by relative path.

    A missing ``root`` (or a missing ``test`` package, or any other missing folder) simply
    yields fewer files.
    """
    root = Path(root)
    skip = frozenset(skip_dirs)
    if not root.is_dir():
        return []
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and d.isidentifier())
        for name in filenames:
            if name.endswith(".py") and not name.startswith(_SKIP_FILE_PREFIXES):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return [path for _, path in found]


# --------------------------------------------------------------------------- stdlib domains


def read_source(path: Path) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_source(source: str) -> ast.Module | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. SyntaxWarning on invalid escapes
        try:
            return ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None


def _nbytes(lines: Sequence[str]) -> int:
    return sum(len(line.encode("utf-8")) + 1 for line in lines)


def _split_long(lines: list[str], max_bytes: int) -> list[list[str]]:
    """Split an over-long run of lines into pieces of at most ``max_bytes``.

    Paragraphs (runs ended by a blank line) first, then single lines, then character slices.
    """
    paragraphs: list[list[str]] = []
    current: list[str] = []
    for line in lines:
        current.append(line)
        if not line.strip():
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    pieces: list[list[str]] = []
    for para in paragraphs:
        if _nbytes(para) <= max_bytes:
            pieces.append(para)
            continue
        for line in para:
            if _nbytes([line]) <= max_bytes:
                pieces.append([line])
            else:  # a single huge line (a data table): cut it; 4 bytes/char at most in UTF-8
                step = max(1, max_bytes // 4 if not line.isascii() else max_bytes - 1)
                pieces.extend([line[i : i + step]] for i in range(0, len(line), step))
    return pieces


def chunk_lines(lines: list[str], cuts: Iterable[int], max_bytes: int) -> list[str]:
    """Cut ``lines`` at ``cuts`` (line indices), split over-long segments, pack greedily."""
    bounds = sorted({0, len(lines), *(c for c in cuts if 0 < c < len(lines))})
    pieces: list[list[str]] = []
    for a, b in zip(bounds, bounds[1:]):
        segment = lines[a:b]
        if _nbytes(segment) <= max_bytes:
            pieces.append(segment)
        else:
            pieces.extend(_split_long(segment, max_bytes))
    chunks: list[list[str]] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        n = _nbytes(piece)
        if current and size + n > max_bytes:
            chunks.append(current)
            current, size = [], 0
        current.extend(piece)
        size += n
    if current:
        chunks.append(current)
    texts = ("\n".join(chunk).strip("\n") for chunk in chunks)
    return [t for t in texts if t.strip()]


def _statement_start(node: ast.stmt, lines: list[str]) -> int:
    """Line index where a statement starts, with its decorators and the comment lines at the
    same indentation directly above it."""
    start = node.lineno
    for deco in getattr(node, "decorator_list", ()):
        start = min(start, deco.lineno)
    i = start - 1
    indent = " " * node.col_offset
    while i > 0 and lines[i - 1].startswith(indent + "#"):
        i -= 1
    return i


def _code_cuts(tree: ast.Module, lines: list[str], max_bytes: int) -> list[int]:
    """Where each top-level statement starts; inside a class too long for one document, also
    where each of its statements (methods, ...) starts."""
    starts = [_statement_start(node, lines) for node in tree.body]
    cuts = list(starts)
    for k, node in enumerate(tree.body):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        if isinstance(node, ast.ClassDef) and _nbytes(lines[starts[k] : end]) > max_bytes:
            cuts.extend(_statement_start(child, lines) for child in node.body[1:])
    return cuts


def split_code(source: str, max_bytes: int = MAX_DOC_BYTES) -> list[str]:
    """One document for a small file; otherwise chunks of consecutive top-level statements
    of at most ``max_bytes``. A class longer than that is cut between its methods, a single
    function or method longer than that at blank lines. ``[]`` for source that does not
    parse."""
    tree = parse_source(source)
    if tree is None:
        return []
    lines = source.split("\n")
    if _nbytes(lines) <= max_bytes:
        text = source.strip("\n")
        return [text] if len(text.strip()) >= _MIN_CODE_DOC_BYTES else []
    chunks = chunk_lines(lines, _code_cuts(tree, lines, max_bytes), max_bytes)
    return [c for c in chunks if len(c.strip()) >= _MIN_CODE_DOC_BYTES]


def _code_documents(files: Sequence[Path], target: int) -> tuple[list[str], int]:
    """Code chunks from ``files`` in order until ``target`` bytes; also the files consumed."""
    docs: list[str] = []
    total = 0
    used = 0
    for path in files:
        if total >= target:
            break
        used += 1
        source = read_source(path)
        if source is None:
            continue
        for chunk in split_code(source):
            docs.append(chunk)
            total += len(chunk.encode("utf-8"))
            if total >= target:
                break
    return docs, used


def _looks_like_prose(doc: str) -> bool:
    if len(doc) < _MIN_DOCSTRING_CHARS or len(doc.split()) < _MIN_DOCSTRING_WORDS:
        return False
    lines = [line.strip() for line in doc.splitlines() if line.strip()]
    doctest = sum(line.startswith((">>>", "...")) for line in lines)
    letters = sum(ch.isalpha() or ch.isspace() for ch in doc)
    return doctest <= len(lines) // 4 and letters >= 0.75 * len(doc)


def docstring_texts(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and _looks_like_prose(doc):
                yield doc.strip()


def pydoc_topics() -> list[tuple[str, str]]:
    """The interactive-help texts (``help('FOR')`` etc.): ~0.45 MB of English prose."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        return []
    return sorted((k, v) for k, v in topics.items() if isinstance(v, str) and v.strip())


def _prose_documents(
    files: Sequence[Path], target: int, rng: random.Random
) -> tuple[list[str], int]:
    """Help topics up to a quarter of ``target``, then docstrings, then the rest of the topics.
    Returns the documents and how many came from the help topics."""
    topics = pydoc_topics()
    rng.shuffle(topics)
    topic_chunks = [
        chunk
        for _, text in topics
        for chunk in chunk_lines(text.strip().split("\n"), (), MAX_DOC_BYTES)
    ]
    docs: list[str] = []
    total = 0
    n_topics = 0
    topic_target = round(target * _PROSE_TOPICS_SHARE)
    while n_topics < len(topic_chunks) and total < topic_target:
        docs.append(topic_chunks[n_topics])
        total += len(topic_chunks[n_topics].encode("utf-8"))
        n_topics += 1

    seen: set[str] = set()
    for path in files:
        if total >= target:
            break
        source = read_source(path)
        tree = parse_source(source) if source is not None else None
        if tree is None:
            continue
        for doc in docstring_texts(tree):
            if doc in seen:
                continue
            seen.add(doc)
            for chunk in chunk_lines(doc.split("\n"), (), MAX_DOC_BYTES):
                docs.append(chunk)
                total += len(chunk.encode("utf-8"))
            if total >= target:
                break

    while n_topics < len(topic_chunks) and total < target:  # docstrings ran out
        docs.append(topic_chunks[n_topics])
        total += len(topic_chunks[n_topics].encode("utf-8"))
        n_topics += 1
    return docs, n_topics


# --------------------------------------------------------------------------- generated domains


def _take(texts: Iterator[str], target: int) -> list[str]:
    docs: list[str] = []
    total = 0
    for text in texts:
        if total >= target:
            break
        docs.append(text)
        total += len(text.encode("utf-8"))
    return docs


_NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonah",
    "Kofi",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yara",
    "Zane",
]
_ITEMS = [
    "pens",
    "notebooks",
    "apples",
    "mugs",
    "batteries",
    "tickets",
    "lamps",
    "books",
    "stamps",
    "candles",
    "plants",
]
_THINGS = ["marbles", "stickers", "cards", "coins", "shells", "stamps", "beads", "pencils"]
_GROUPS = (("boxes", "box"), ("children", "child"), ("teams", "team"), ("shelves", "shelf"))
_PRICED = ["jacket", "bicycle", "lamp", "chair", "backpack", "camera", "kettle", "guitar"]
_VEHICLES = (("train", 60, 160), ("bus", 30, 90), ("car", 40, 130), ("cyclist", 10, 30))


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _p_shop(rng: random.Random) -> tuple[str, str]:
    item = rng.choice(_ITEMS)
    n, p = rng.randint(2, 40), rng.randint(2, 25)
    return (
        f"A shop sells {n} {item} at {p} dollars each. "
        f"How much do the {item} cost in total, in dollars?",
        f"{n} * {p} = {n * p}. The answer is {n * p}.",
    )


def _p_give_and_buy(rng: random.Random) -> tuple[str, str]:
    name, other = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    a = rng.randint(20, 120)
    b = rng.randint(1, a - 1)
    c = rng.randint(1, 60)
    return (
        f"{name} has {a} {thing}. {name} gives {b} of them to {other} and then buys {c} more. "
        f"How many {thing} does {name} have now?",
        f"After giving some away, {name} has {a} - {b} = {a - b} {thing}. "
        f"After buying more, {a - b} + {c} = {a - b + c}. The answer is {a - b + c}.",
    )


def _p_share(rng: random.Random) -> tuple[str, str]:
    groups, group = rng.choice(_GROUPS)
    thing = rng.choice(_THINGS)
    k, q = rng.randint(2, 12), rng.randint(2, 25)
    return (
        f"{k * q} {thing} are shared equally among {k} {groups}. "
        f"How many {thing} does each {group} get?",
        f"{k * q} / {k} = {q}. The answer is {q}.",
    )


def _p_fraction_sum(rng: random.Random) -> tuple[str, str]:
    while True:
        b, d = rng.randint(2, 12), rng.randint(2, 12)
        a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
        if Fraction(a, b) != Fraction(c, d):
            break
    op = rng.choice("+-")
    if op == "-" and Fraction(a, b) < Fraction(c, d):
        a, b, c, d = c, d, a, b
    lcd = b * d // math.gcd(b, d)
    a2, c2 = a * lcd // b, c * lcd // d
    s = a2 + c2 if op == "+" else a2 - c2
    result = Fraction(s, lcd)
    steps = (
        f"The least common denominator of {b} and {d} is {lcd}. "
        f"{a}/{b} = {a2}/{lcd} and {c}/{d} = {c2}/{lcd}. "
        f"{a2}/{lcd} {op} {c2}/{lcd} = {s}/{lcd}."
    )
    if result.denominator != lcd:
        steps += f" In lowest terms, {s}/{lcd} = {_fmt(result)}."
    return (
        f"What is {a}/{b} {op} {c}/{d}? Give the answer as a fraction in lowest terms.",
        f"{steps} The answer is {_fmt(result)}.",
    )


def _p_fraction_of(rng: random.Random) -> tuple[str, str]:
    q = rng.randint(2, 10)
    p = rng.randint(1, q - 1)
    n = q * rng.randint(2, 20)
    return (
        f"What is {p}/{q} of {n}?",
        f"{n} / {q} = {n // q}. {n // q} * {p} = {n // q * p}. The answer is {n // q * p}.",
    )


def _p_discount(rng: random.Random) -> tuple[str, str]:
    item = rng.choice(_PRICED)
    price = 20 * rng.randint(1, 25)
    pct = rng.choice((5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 75))
    disc = price * pct // 100  # exact: 20 * 5 divides 100
    return (
        f"A {item} costs {price} dollars. During a sale its price is reduced by {pct}%. "
        "What is the sale price in dollars?",
        f"The discount is {price} * {pct} / 100 = {disc}. "
        f"The sale price is {price} - {disc} = {price - disc}. The answer is {price - disc}.",
    )


def _p_percentage(rng: random.Random) -> tuple[str, str]:
    total = rng.choice((20, 25, 40, 50, 80, 200, 400, 500))
    step = total // math.gcd(total, 100)
    part = step * rng.randint(1, total // step - 1)
    pct = 100 * part // total
    return (
        f"In a school year of {total} students, {part} passed the exam. "
        "What percentage of the students passed?",
        f"{part} / {total} * 100 = {pct}. The answer is {pct}%.",
    )


def _p_linear(rng: random.Random) -> tuple[str, str]:
    a, x = rng.randint(2, 12), rng.randint(1, 20)
    if rng.random() < 0.5:
        b = rng.randint(1, 50)
        c = a * x + b
        first = f"Subtract {b} from both sides: {c} - {b} = {a * x}"
        question = f"Solve for x: {a}x + {b} = {c}."
    else:
        b = rng.randint(1, min(50, a * x - 1))
        c = a * x - b
        first = f"Add {b} to both sides: {c} + {b} = {a * x}"
        question = f"Solve for x: {a}x - {b} = {c}."
    return (
        question,
        f"{first}, so {a}x = {a * x}. Divide both sides by {a}: {a * x} / {a} = {x}, "
        f"so x = {x}. The answer is {x}.",
    )


def _p_expression(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 9)
    s, p = a + b, (a + b) * c
    d = rng.randint(1, p)
    return (
        f"Compute ({a} + {b}) * {c} - {d}.",
        f"First the parentheses: {a} + {b} = {s}. Then {s} * {c} = {p}. "
        f"Finally {p} - {d} = {p - d}. The answer is {p - d}.",
    )


def _p_speed(rng: random.Random) -> tuple[str, str]:
    vehicle, lo, hi = rng.choice(_VEHICLES)
    v, h = 5 * rng.randint(lo // 5, hi // 5), rng.randint(2, 9)
    return (
        f"A {vehicle} travels at {v} km per hour for {h} hours. "
        "How many kilometres does it travel?",
        f"Distance is speed times time: {v} * {h} = {v * h}. The answer is {v * h}.",
    )


def _p_mean(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(3, 6)
    values = [rng.randint(50, 100) for _ in range(n)]
    values[-1] += (-sum(values)) % n
    if values[-1] > 100:
        values[-1] -= n
    total = sum(values)
    listed = ", ".join(map(str, values[:-1])) + f" and {values[-1]}"
    return (
        f"The scores of {n} students on a test are {listed}. What is the mean score?",
        f"The sum is {' + '.join(map(str, values))} = {total}. "
        f"{total} / {n} = {total // n}. The answer is {total // n}.",
    )


def _p_rectangle(rng: random.Random) -> tuple[str, str]:
    w, length = rng.randint(2, 40), rng.randint(2, 40)
    garden = f"A rectangular garden is {w} metres wide and {length} metres long."
    if rng.random() < 0.5:
        return (
            f"{garden} What is its area in square metres?",
            f"Area is width times length: {w} * {length} = {w * length}. "
            f"The answer is {w * length}.",
        )
    perimeter = 2 * (w + length)
    return (
        f"{garden} How long is the fence around it, in metres?",
        f"The perimeter is 2 * ({w} + {length}) = {perimeter}. The answer is {perimeter}.",
    )


def _p_minutes(rng: random.Random) -> tuple[str, str]:
    h, m = rng.randint(1, 12), rng.randint(1, 59)
    return (
        f"How many minutes are there in {h} hours and {m} minutes?",
        f"{h} * 60 = {h * 60}. {h * 60} + {m} = {h * 60 + m}. The answer is {h * 60 + m}.",
    )


def _p_squares(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    return (
        f"What is {a} squared plus {b} squared?",
        f"{a} * {a} = {a * a}. {b} * {b} = {b * b}. {a * a} + {b * b} = {a * a + b * b}. "
        f"The answer is {a * a + b * b}.",
    )


_MATH_TEMPLATES: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    _p_shop,
    _p_give_and_buy,
    _p_share,
    _p_fraction_sum,
    _p_fraction_of,
    _p_discount,
    _p_percentage,
    _p_linear,
    _p_expression,
    _p_speed,
    _p_mean,
    _p_rectangle,
    _p_minutes,
    _p_squares,
)


def math_qa(rng: random.Random) -> Iterator[tuple[str, str]]:
    """Endless (question, worked answer) pairs; every step in the answer has the form
    ``<arithmetic> = <value>`` and is correct, and it ends ``The answer is N.``"""
    while True:
        yield rng.choice(_MATH_TEMPLATES)(rng)


def math_problems(rng: random.Random) -> Iterator[str]:
    """Endless word problems ``"Q: ...\\nA: ... The answer is N."`` (`math_qa` as text)."""
    for question, answer in math_qa(rng):
        yield f"Q: {question}\nA: {answer}"


_FIRST = [
    "Alice",
    "Bruno",
    "Carmen",
    "Dmitri",
    "Emma",
    "Felix",
    "Giulia",
    "Hassan",
    "Ingrid",
    "Jamal",
    "Keiko",
    "Liam",
    "Maria",
    "Nikolai",
    "Olivia",
    "Pedro",
    "Rania",
    "Stefan",
    "Tanvi",
    "Ulrich",
    "Valentina",
    "William",
    "Xin",
    "Yusuf",
    "Zoe",
]
_LAST = [
    "Adams",
    "Becker",
    "Costa",
    "Dubois",
    "Evans",
    "Fischer",
    "Garcia",
    "Hansen",
    "Ito",
    "Jensen",
    "Kowalski",
    "Lopez",
    "Martin",
    "Nguyen",
    "Okafor",
    "Petrov",
    "Rossi",
    "Schmidt",
    "Tanaka",
    "Varga",
    "Walsh",
    "Young",
    "Zhang",
]
_CITIES = (
    ("Lisbon", "PT"),
    ("Berlin", "DE"),
    ("Lyon", "FR"),
    ("Osaka", "JP"),
    ("Toronto", "CA"),
    ("Austin", "US"),
    ("Krakow", "PL"),
    ("Turin", "IT"),
    ("Aarhus", "DK"),
    ("Lagos", "NG"),
    ("Pune", "IN"),
    ("Valencia", "ES"),
)
_PRODUCTS = (
    ("SKU-1001", "USB-C cable", 899),
    ("SKU-1002", "Wireless mouse", 2499),
    ("SKU-1003", "Mechanical keyboard", 8900),
    ("SKU-1004", "Laptop stand", 3450),
    ("SKU-1005", "Notebook A5", 450),
    ("SKU-1006", "Desk lamp", 2999),
    ("SKU-1007", "Coffee mug", 1200),
    ("SKU-1008", "Headphones", 5999),
    ("SKU-1009", "Monitor 27in", 21900),
    ("SKU-1010", "Webcam", 4599),
)
_ORDER_STATUS = ("pending", "paid", "shipped", "delivered", "cancelled")
_MERCHANTS = (
    "Grocery Market",
    "City Transit",
    "Electric Utility",
    "Book Corner",
    "Pharmacy",
    "Coffee House",
    "Hardware Store",
    "Cinema",
)
_EPOCH = date(2020, 1, 1)


def _money(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    return f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}"


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().rstrip("\n")


def record_texts(rng: random.Random) -> Iterator[str]:
    """Endless records: people and orders as JSON objects, sensor logs and bank statements as
    CSV tables; each kind has one fixed schema and consistent values (order totals are the
    sum of their lines, balances the running sum of the amounts, orders name known people)."""
    people: list[str] = []
    n_orders = 0
    while True:
        kind = rng.choices(("person", "order", "sensor", "bank"), weights=(3, 3, 2, 2))[0]
        if kind == "order" and not people:
            kind = "person"
        if kind == "person":
            yield json.dumps(_person(rng, people))
        elif kind == "order":
            n_orders += 1
            yield json.dumps(_order(rng, people, n_orders))
        elif kind == "sensor":
            yield _sensor_log(rng)
        else:
            yield _bank_statement(rng)


def person_record(rng: random.Random, people: list[str]) -> dict:
    """A person record of the records domain; its id joins `people`."""
    return _person(rng, people)


def order_record(rng: random.Random, people: list[str], number: int) -> dict:
    """Order `number` of a person in `people` (not empty), as the records domain writes it."""
    return _order(rng, people, number)


def _person(rng: random.Random, people: list[str]) -> dict:
    """A person record; its id joins `people`."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    city, country = rng.choice(_CITIES)
    pid = f"P{len(people) + 1:05d}"
    people.append(pid)
    signup = datetime(2019, 1, 1) + timedelta(seconds=rng.randrange(5 * 365 * 86400))
    return {
        "id": pid,
        "first_name": first,
        "last_name": last,
        "email": f"{first}.{last}{rng.randint(1, 99)}@example.com".lower(),
        "birth_date": (date(1950, 1, 1) + timedelta(days=rng.randrange(55 * 365))).isoformat(),
        "city": city,
        "country": country,
        "signup": signup.isoformat() + "Z",
        "active": rng.random() < 0.8,
    }


def _order(rng: random.Random, people: list[str], number: int) -> dict:
    """Order `number` of a known person; its total is the sum of its lines."""
    ordered = _EPOCH + timedelta(days=rng.randrange(4 * 365))
    items = []
    total = 0
    for sku, name, price in rng.sample(_PRODUCTS, rng.randint(1, 4)):
        qty = rng.randint(1, 5)
        total += qty * price
        line = {"sku": sku, "name": name, "qty": qty, "unit_price": _money(price)}
        items.append(line | {"line_total": _money(qty * price)})
    status = rng.choice(_ORDER_STATUS)
    shipped = (
        (ordered + timedelta(days=rng.randint(1, 6))).isoformat()
        if status in ("shipped", "delivered")
        else None
    )
    return {
        "order_id": f"O-{ordered.year}-{number:06d}",
        "customer_id": rng.choice(people),
        "order_date": ordered.isoformat(),
        "status": status,
        "shipped_date": shipped,
        "currency": "USD",
        "items": items,
        "total": _money(total),
    }


def _sensor_log(rng: random.Random) -> str:
    """A CSV log of one sensor's readings at a fixed interval."""
    sensor = f"S-{rng.randint(1, 40):03d}"
    start = datetime(2024, 1, 1) + timedelta(minutes=15 * rng.randrange(365 * 96))
    every = rng.choice((5, 10, 15, 30))
    temp, hum, pres = rng.uniform(5, 30), rng.uniform(30, 80), rng.uniform(990, 1030)
    rows = []
    for i in range(rng.randint(8, 24)):
        temp += rng.uniform(-0.4, 0.4)
        hum = min(100.0, max(0.0, hum + rng.uniform(-1.5, 1.5)))
        pres += rng.uniform(-0.3, 0.3)
        ts = (start + timedelta(minutes=every * i)).isoformat() + "Z"
        rows.append((ts, sensor, f"{temp:.2f}", f"{hum:.1f}", f"{pres:.1f}"))
    return _csv_text(
        ("timestamp", "sensor_id", "temperature_c", "humidity_pct", "pressure_hpa"), rows
    )


def _bank_statement(rng: random.Random) -> str:
    """A CSV bank statement whose balance is the running sum of its amounts."""
    account = f"ACC-{rng.randint(10000, 99999)}"
    day = _EPOCH + timedelta(days=rng.randrange(4 * 365))
    balance = rng.randint(50_000, 500_000)
    rows = []
    for _ in range(rng.randint(6, 18)):
        day += timedelta(days=rng.randint(0, 3))
        if rng.random() < 0.15:
            description, amount = "Salary", rng.randint(150_000, 400_000)
        else:
            description, amount = rng.choice(_MERCHANTS), -rng.randint(150, 20_000)
        balance += amount
        rows.append((day.isoformat(), account, description, _money(amount), _money(balance)))
    return _csv_text(("date", "account", "description", "amount", "balance"), rows)


# --------------------------------------------------------------------------- output


def corpus_texts(corpus: Path) -> Iterator[str]:
    """Every document of a corpus folder this module wrote (`DOMAIN/*.jsonl`), folders in
    sorted order: what the demo's tokenizers are trained on."""
    for f in sorted(corpus.glob("*/*.jsonl")):
        with f.open(encoding="utf-8") as lines:
            for line in lines:
                yield json.loads(line)["text"]


def write_domain_jsonl(path: Path, texts: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for text in texts:
            line = json.dumps({"text": text}, ensure_ascii=False)
            # Characters str.splitlines() treats as line breaks must not appear raw.
            line = line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
            f.write(line.replace("\x85", "\\u0085") + "\n")
    tmp.replace(path)


def _sources_md(
    stats: dict[str, dict], *, scale: float, seed: int, n_code_files: int, n_topics: int
) -> str:
    version = ".".join(map(str, sys.version_info[:3]))
    rows = "\n".join(
        f"| `{d}` | {stats[d]['documents']:,} | {stats[d]['bytes']:,} |" for d in DOMAINS
    )
    return f"""# Demo corpus sources

Built offline by `ddk.demo.corpus.build_demo_corpus` (scale {scale:g}, seed {seed},
Python {version}). Each domain is `<domain>/{_FILE_NAME}`: one JSON object per line with
the document in the field `"text"`. Documents are shuffled within a domain.

| domain | documents | bytes (UTF-8 text) |
|---|---:|---:|
{rows}

- `code`: Python source files of the standard library of the Python that built the corpus
  (read from {n_code_files} files, picked at random by the seed), one document per file or per
  chunk of consecutive top-level statements of at most {MAX_DOC_BYTES} bytes. Not read:
  {", ".join(f"`{d}`" for d in sorted(SKIP_DIRS))}, and folders that are not packages.
- `prose`: English technical prose from the same standard library: {n_topics} chunks of the
  interactive-help texts (`pydoc_data.topics`), and module, class and function docstrings
  read with `ast` (no module is imported), preferring files the code domain did not use;
  docstrings shorter than {_MIN_DOCSTRING_WORDS} words or mostly doctest are left out.
- `math`: generated arithmetic word problems ({len(_MATH_TEMPLATES)} templates: products,
  sharing, fractions, percentages, linear equations, order of operations, speed, means,
  areas, unit conversion), each with a worked answer whose every step `a op b = c` is exact,
  ending "The answer is N.".
- `records`: generated structured records: people and orders as JSON objects, sensor
  readings and bank statements as CSV tables, with fixed schemas and ISO 8601 dates; names,
  products and places are invented.

The standard-library text is © Python Software Foundation, under the PSF License
Agreement; the generated domains are synthetic. There is no non-English domain: no
non-English text ships reliably with every Python install.
"""
