"""Named corpus shapes for testing domain discovery, built offline from a Python install.

    python -m ddk.demo.corpora --shape unbalanced --out DIR [--seed 0] [--scale 1]
    python -m ddk.demo.corpora --list

A *source* makes documents of one kind (English docstrings, C headers, generated word
problems...); a *shape* says how many documents each source contributes, as a count or as a
share of the shape's total. The output is the layout `ddk prepare` reads (`DIR/<domain>/
part-00000.jsonl`, one `{"text": ...}` per line) plus `DIR/SOURCES.md`, so the true domains are
the folder names: prepare the folder to get labelled data, or pool the files without labels to
test `--auto-domains`.

Sources read only what the running Python ships. Some of it is optional (the C headers under
`include/`, the Tcl/Tk library behind tkinter): a source that finds nothing raises
`SourceUnavailable`, and the shape falls back to the source's `fallbacks` (the first one not
already in the shape), printing one line that says what was replaced and why.

To add a shape: add a `Shape` to `SHAPES`. To add a kind of text: a function
`(n, BuildContext) -> list[str]` (up to n documents) and a `Source` in `SOURCES`.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import sysconfig
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ddk.demo.corpus import (
    MAX_DOC_BYTES,
    chunk_lines,
    default_stdlib_dir,
    docstring_texts,
    math_problems,
    parse_source,
    pydoc_topics,
    read_source,
    record_texts,
    split_code,
    stdlib_python_files,
    write_domain_jsonl,
)

FILE_NAME = "part-00000.jsonl"
_MIN_FILE_DOC_BYTES = 200  # a code chunk smaller than this (an include list) is not a document
_MAX_FILES = 2000  # a source reads at most this many files (the Tcl search can be wide)


class SourceUnavailable(Exception):
    """This Python install does not ship what a source reads (the message says what)."""


@dataclass
class BuildContext:
    """What sources share while one corpus is built: the seed, the standard library's files in
    a seeded order, and the stdlib texts already taken (so two domains never share a text)."""

    seed: int
    stdlib_dir: Path = field(default_factory=default_stdlib_dir)
    used: set[str] = field(default_factory=set)

    def rng(self, source: str) -> random.Random:
        return random.Random(f"{self.seed}:{source}")

    @cached_property
    def stdlib_files(self) -> list[Path]:
        files = stdlib_python_files(self.stdlib_dir)
        random.Random(f"{self.seed}:stdlib-order").shuffle(files)
        return files

    def take(self, texts: Iterator[str], n: int) -> list[str]:
        """Up to n texts nobody took yet; marks them taken."""
        out = []
        for text in texts:
            if len(out) >= n:
                break
            if text not in self.used:
                self.used.add(text)
                out.append(text)
        return out


@dataclass(frozen=True)
class Source:
    make: Callable[[int, BuildContext], list[str]]
    description: str
    fallbacks: tuple[str, ...] = ()


# --------------------------------------------------------------------------- sources


def _generated(stream: Callable[[random.Random], Iterator[str]], name: str):
    def make(n: int, ctx: BuildContext) -> list[str]:
        it = stream(ctx.rng(name))
        return [next(it) for _ in range(n)]

    return make


def _stdlib_docstrings(ctx: BuildContext, files: Sequence[Path]) -> Iterator[str]:
    for path in files:
        source = read_source(path)
        tree = parse_source(source) if source is not None else None
        if tree is not None:
            for doc in docstring_texts(tree):
                yield from chunk_lines(doc.split("\n"), (), MAX_DOC_BYTES)


def _prose(n: int, ctx: BuildContext) -> list[str]:
    """English technical prose: the interactive-help topics, then docstrings."""
    topics = [
        chunk
        for _, text in pydoc_topics()
        for chunk in chunk_lines(text.strip().split("\n"), (), MAX_DOC_BYTES)
    ]
    ctx.rng("prose").shuffle(topics)
    quarter = ctx.take(iter(topics), n // 4)
    rest = ctx.take(_stdlib_docstrings(ctx, ctx.stdlib_files), n - len(quarter))
    return quarter + rest + ctx.take(iter(topics), n - len(quarter) - len(rest))


def _python(n: int, ctx: BuildContext) -> list[str]:
    """Python source of the standard library, one document per file or chunk of statements."""
    chunks = (c for path in ctx.stdlib_files for c in split_code(read_source(path) or ""))
    return ctx.take((c for c in chunks if len(c.encode()) >= _MIN_FILE_DOC_BYTES), n)


# Han characters for the cipher: the CJK Unified Ideographs block (U+4E00-U+9FA5).
_HAN_FIRST, _HAN_COUNT = 0x4E00, 0x9FA6 - 0x4E00
_HAN_PUNCT = str.maketrans({",": "，", ".": "。", ":": "：", ";": "；", "?": "？", "!": "！"})
_HAN_PUNCT.update({ord("("): "（", ord(")"): "）"})
_HAN_TOKEN = re.compile(r"[A-Za-z]+|[0-9]+|[,.:;?!()]|\n")


def han_cipher(text: str) -> str:
    """English -> Han-script text with the same word statistics: each word becomes a fixed run
    of 1-3 Han characters (by its length; chosen by a hash of the word, so a word is always the
    same characters), numbers stay, punctuation becomes full-width, other symbols and the
    spaces between words go, line breaks stay. Real Chinese differs in grammar, not in what a
    clusterer sees: no ASCII, no spaces, a Zipfian vocabulary."""
    out = []
    for tok in _HAN_TOKEN.findall(text):
        if tok[0].isalpha():
            word = tok.lower()
            k = 1 if len(word) <= 3 else 2 if len(word) <= 7 else 3
            out.append(
                "".join(
                    chr(_HAN_FIRST + zlib.crc32(f"{word}:{i}".encode()) % _HAN_COUNT)
                    for i in range(k)
                )
            )
        else:
            out.append(tok.translate(_HAN_PUNCT))
    return re.sub(r"\n{3,}", "\n\n", "".join(out)).strip()


def _han(n: int, ctx: BuildContext) -> list[str]:
    """Han-script prose: docstrings (from the end of the file order, away from `prose`'s)
    through `han_cipher`."""
    docs = ctx.take(_stdlib_docstrings(ctx, ctx.stdlib_files[::-1]), n)
    return [t for t in (han_cipher(d) for d in docs) if t]


def _file_chunks(files: Sequence[Path]) -> Iterator[str]:
    """Each file as one document, or chunks of whole blank-line-separated blocks."""
    for path in files:
        text = read_source(path)
        if text is None:
            continue
        for chunk in chunk_lines(text.split("\n"), (), MAX_DOC_BYTES):
            if len(chunk.encode()) >= _MIN_FILE_DOC_BYTES:
                yield chunk


def _shuffled(files: set[Path], ctx: BuildContext, name: str) -> list[Path]:
    ordered = sorted(files)[:_MAX_FILES]
    ctx.rng(name).shuffle(ordered)
    return ordered


def c_header_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(Path(paths[k]) for k in ("include", "platinclude") if k in paths))


def _c(n: int, ctx: BuildContext) -> list[str]:
    """C: the CPython headers this install ships for building extensions (include/python3.x)."""
    files = {p for d in c_header_dirs() if d.is_dir() for p in d.rglob("*.h")}
    if not files:
        where = ", ".join(map(str, c_header_dirs())) or "sysconfig has no include path"
        raise SourceUnavailable(f"no C headers in {where} (a Python without its -dev files)")
    return ctx.take(_file_chunks(_shuffled(files, ctx, "c")), n)


def tcl_library_dirs() -> list[Path]:
    """Where Tcl/Tk scripts live: the library tkinter's Tcl reports, and the `tcl/` and
    `lib/tcl*`, `lib/tk*` folders of python.org, conda and Windows installs."""
    found = []
    try:
        import tkinter  # optional: not every Python is built with Tcl/Tk

        found.append(Path(tkinter.Tcl().eval("info library")).parent)
    except Exception:  # ImportError, or a TclError when the library is missing
        pass
    base = Path(sys.base_prefix)
    found += [base / "tcl", *sorted(base.glob("lib/tcl8*")), *sorted(base.glob("lib/tk8*"))]
    return [d for d in dict.fromkeys(found) if d.is_dir()]


def _tcl(n: int, ctx: BuildContext) -> list[str]:
    """Tcl: the scripts of the Tcl/Tk library tkinter runs on (*.tcl)."""
    files = {p for d in tcl_library_dirs() for p in d.rglob("*.tcl")}
    if not files:
        raise SourceUnavailable("no Tcl/Tk library (*.tcl) found: this Python has no tkinter")
    return ctx.take(_file_chunks(_shuffled(files, ctx, "tcl")), n)


SOURCES: dict[str, Source] = {
    "math": Source(
        _generated(math_problems, "math"),
        "generated arithmetic word problems with worked answers (`ddk.demo.corpus`)",
    ),
    "records": Source(
        _generated(record_texts, "records"),
        "generated JSON records and CSV tables (`ddk.demo.corpus`)",
    ),
    "prose": Source(
        _prose, "English prose: `pydoc_data` help topics and standard-library docstrings"
    ),
    "python": Source(_python, "Python: standard-library source, per file or statement chunk"),
    "han": Source(
        _han,
        "Han-script prose: standard-library docstrings, each word enciphered as 1-3 Han "
        "characters (`han_cipher`); no ASCII letters, no spaces",
    ),
    "c": Source(_c, "C: the CPython headers under include/", fallbacks=("tcl", "python")),
    "tcl": Source(_tcl, "Tcl: the Tcl/Tk library's scripts", fallbacks=("c", "python")),
    # `prose` without the help topics: three quarters of `prose` is this, so the two domains
    # nearly duplicate each other (a split of one real domain).
    "docstrings": Source(
        lambda n, ctx: ctx.take(_stdlib_docstrings(ctx, ctx.stdlib_files), n),
        "English prose: standard-library docstrings only (a near-duplicate of `prose`)",
    ),
}


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """`domains`: source -> documents (int) or share of `documents` (float)."""

    description: str
    domains: dict[str, int | float]
    documents: int | None = None

    def counts(self, scale: float = 1.0) -> dict[str, int]:
        out = {}
        for source, size in self.domains.items():
            n = size if isinstance(size, int) else size * (self.documents or 0)
            out[source] = max(1, round(n * scale))
        return out


SHAPES: dict[str, Shape] = {
    # The shape of the corpus issue 23 measured (math 85 %, drama 7 %, Chinese 7 %, C 0.8 %,
    # Lua 0.4 %): one dominant domain made from templates (so it splits easily), two mid-size
    # prose domains in two scripts, two small code domains in two languages.
    "unbalanced": Shape(
        "one domain of 84 %, two of 7 %, two code domains under 1 % (C and Tcl)",
        {"math": 5100, "prose": 430, "han": 430, "c": 50, "tcl": 35},
    ),
    # Corpora for choosing and confirming a DDK setting (benchmarks/method_sweep.py): more
    # domains than the demo, sizes (in bytes) 15x apart, and domains a student pre-trained on
    # prose never saw (Han script, C, Tcl: benchmarks/sweep_bases.py's student mixes).
    "skewed7": Shape(
        "seven domains, 1 MB down to 70 kB: prose, Python, word problems, records, Han, C, Tcl",
        {"prose": 900, "python": 300, "math": 1200, "records": 300, "han": 150, "c": 25, "tcl": 20},
    ),
    # Two domains that are nearly one (`docstrings` is most of what `prose` is made of), so
    # DDK's weights split between them; C headers as the domain far from everything else.
    "near_dup6": Shape(
        "six domains; `docstrings` nearly duplicates `prose`; C headers at 60 documents",
        {"prose": 600, "python": 250, "math": 600, "records": 300, "docstrings": 300, "c": 60},
    ),
    # A fifth corpus for confirming a chosen DDK setting, defined (issue 19) before any run on
    # it and before the candidates' 3-seed results were read. Every source, so 8 domains (Eq.
    # 2's floor (1-alpha)/N is smallest here); the near-duplicate pair of near_dup6
    # (docstrings/prose); and one domain both large and hard that is not math: `records`, about
    # a quarter of the tokens, templated (the teacher's perplexity is low, so the student's
    # ratio is high) and never in the student's pre-training (benchmarks/sweep_bases.py), as
    # are Python (the other large domain), C and Tcl. Han is mid-size and seen a little.
    "wide8": Shape(
        "eight domains; records (a quarter of the tokens) and Python large and unseen by the "
        "student; docstrings nearly duplicate prose",
        {
            "records": 450,
            "python": 120,
            "prose": 250,
            "docstrings": 250,
            "math": 600,
            "han": 120,
            "c": 30,
            "tcl": 25,
        },
    ),
    # A sixth corpus, defined (issue 19, round 4) before any run on it, to confirm a setting
    # chosen on the five above: Han is the largest domain and barely seen by the student
    # (benchmarks/sweep_bases.py), code in three languages at three sizes, records small.
    "han7": Shape(
        "seven domains; Han script the largest and barely seen by the student; Python, "
        "C and Tcl at three sizes; records and word problems small",
        {"han": 700, "prose": 300, "python": 150, "math": 250, "records": 120, "c": 40, "tcl": 30},
    ),
    # A seventh, defined (issue 19, round 4) before any run on it, after han7's runs were read:
    # code-heavy (Python the largest domain, C mid-size), docstrings and prose both present,
    # Han small; the student saw prose and a little math (benchmarks/sweep_bases.py).
    "code7": Shape(
        "seven domains; Python the largest and unseen by the student, C mid-size, docstrings "
        "next to prose, Han small",
        {
            "python": 500,
            "c": 120,
            "prose": 250,
            "docstrings": 200,
            "math": 200,
            "records": 150,
            "han": 60,
        },
    ),
    # An eighth, defined (issue 19, round 5) before any run on it, to check preset `focus`
    # (round 4's focus4n): four domains the student never saw (records, Python and Han at 150
    # documents, C at 60), so several domains lag at once, not one; prose and math seen.
    "lag6": Shape(
        "six domains; four unseen by the student (records, Python and Han at 150 documents, C "
        "at 60); prose the largest",
        {"prose": 500, "math": 300, "records": 150, "python": 150, "han": 150, "c": 60},
    ),
}


def build_corpus(
    shape: str | Shape,
    out_dir: Path,
    *,
    seed: int = 0,
    scale: float = 1.0,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Write the shape's corpus to `out_dir`; return {domain: {"documents", "bytes",
    "source"}}. A source this install lacks is replaced by its first fallback not in the shape
    (one line through `log`); a source that makes fewer documents than asked is logged too."""
    spec = SHAPES[shape] if isinstance(shape, str) else shape
    name = shape if isinstance(shape, str) else "custom"
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    out_dir = Path(out_dir)
    stray = [p for p in out_dir.glob("*/*.jsonl") if p.name != FILE_NAME]
    if stray:
        raise FileExistsError(
            f"{out_dir} holds other JSONL files ({stray[0]}); use an empty folder"
        )
    ctx = BuildContext(seed)
    planned = list(spec.domains)
    stats: dict[str, dict] = {}
    for source, n in spec.counts(scale).items():
        used, texts, why = _make(source, n, ctx, planned)
        if used != source:
            log(f"corpus '{name}': {why}; using '{used}' instead of '{source}'")
            planned.append(used)
        if len(texts) < n:
            log(f"corpus '{name}': source '{used}' made {len(texts)} of {n} documents")
        ctx.rng(f"{used}:order").shuffle(texts)
        write_domain_jsonl(out_dir / used / FILE_NAME, texts)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        stats[used] = {"documents": len(texts), "bytes": nbytes, "source": used}
    (out_dir / "SOURCES.md").write_text(_sources_md(name, spec, stats, seed, scale))
    return stats


def _make(source: str, n: int, ctx: BuildContext, planned: list[str]):
    """(source used, documents, why the planned one was replaced)."""
    try:
        return source, SOURCES[source].make(n, ctx), ""
    except SourceUnavailable as e:
        for alt in SOURCES[source].fallbacks:
            if alt in planned:
                continue
            try:
                return alt, SOURCES[alt].make(n, ctx), str(e)
            except SourceUnavailable:
                continue
        raise SourceUnavailable(f"{e}, and no fallback of '{source}' is available") from None


def _sources_md(name: str, spec: Shape, stats: dict[str, dict], seed: int, scale: float) -> str:
    total = sum(s["documents"] for s in stats.values())
    rows = "\n".join(
        f"| `{d}` | {s['documents']:,} | {100 * s['documents'] / total:.1f} % | {s['bytes']:,} "
        f"| {SOURCES[d].description} |"
        for d, s in stats.items()
    )
    version = ".".join(map(str, sys.version_info[:3]))
    return f"""# Corpus '{name}': {spec.description}

Built offline by `python -m ddk.demo.corpora --shape {name} --seed {seed} --scale {scale:g}`
(Python {version}). Each domain is `<domain>/{FILE_NAME}`, one JSON object per line with the
document in `"text"`, shuffled within the domain.

| domain | documents | share | bytes | source |
|---|---:|---:|---:|---|
{rows}

The standard-library, header and Tcl texts are © their authors (PSF License, Tcl/Tk license);
generated and enciphered texts are synthetic.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddk.demo.corpora", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), help="which corpus to build")
    parser.add_argument("--out", help="output folder (the layout `ddk prepare` reads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every count")
    parser.add_argument("--list", action="store_true", help="list the shapes and sources")
    args = parser.parse_args(argv)
    if args.list or not args.shape:
        for key, spec in SHAPES.items():
            print(
                f"{key}: {spec.description}: "
                + ", ".join(f"{s}={n}" for s, n in spec.counts().items())
            )
        return 0
    if not args.out:
        parser.error("--out is required with --shape")
    try:
        stats = build_corpus(args.shape, Path(args.out), seed=args.seed, scale=args.scale)
    except (SourceUnavailable, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(s["documents"] for s in stats.values())
    for d, s in stats.items():
        print(f"{d:>10}  {s['documents']:6,} documents  {100 * s['documents'] / total:5.1f} %")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
