"""The offline demo corpus (ddk.demo.corpus): layout, sizes, correctness, determinism."""

from __future__ import annotations

import ast
import csv
import io
import json
import re
import shutil
from fractions import Fraction
from pathlib import Path

import pytest

from ddk.demo import corpus
from ddk.demo.corpus import DOMAINS, MAX_DOC_BYTES, TARGET_BYTES, build_demo_corpus

SCALE = 0.02
MIN_DOCS = 10


def _read_domain(root: Path, domain: str) -> list[str]:
    texts = []
    for path in sorted((root / domain).glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                obj = json.loads(line)
                assert isinstance(obj, dict)
                assert isinstance(obj["text"], str)
                texts.append(obj["text"])
    return texts


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_corpus")
    stats = build_demo_corpus(out, scale=SCALE, seed=0)
    return out, stats


def test_layout_every_line_is_json_with_text(built):
    out, stats = built
    assert list(stats) == list(DOMAINS)
    assert (out / "SOURCES.md").read_text(encoding="utf-8").startswith("# Demo corpus sources")
    assert sorted(p.name for p in out.iterdir()) == sorted([*DOMAINS, "SOURCES.md"])
    for domain in DOMAINS:
        files = list((out / domain).glob("*.jsonl"))
        assert files, domain
        for path in files:  # one document per line, nothing else
            raw = path.read_text(encoding="utf-8")
            assert raw.endswith("\n")
            assert len(raw.splitlines()) == raw.count("\n")  # no stray line separators
        texts = _read_domain(out, domain)
        assert len(texts) == stats[domain]["documents"] >= MIN_DOCS, domain
        assert all(t.strip() for t in texts), domain
        assert sum(len(t.encode("utf-8")) for t in texts) == stats[domain]["bytes"]


def test_sizes_unequal_in_intended_order(built):
    _, stats = built
    sizes = [stats[d]["bytes"] for d in DOMAINS]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), stats
    for domain in DOMAINS:
        target = TARGET_BYTES[domain] * SCALE
        assert target <= stats[domain]["bytes"] <= target + MAX_DOC_BYTES, (domain, stats)


def test_domains_have_their_nature(built):
    out, _ = built
    code = _read_domain(out, "code")
    assert sum("def " in t or "class " in t for t in code) >= len(code) // 2
    assert all(len(t.encode("utf-8")) <= MAX_DOC_BYTES for t in code)
    prose = _read_domain(out, "prose")
    assert all(len(t.encode("utf-8")) <= MAX_DOC_BYTES for t in prose)
    letters = sum(ch.isalpha() or ch.isspace() for t in prose for ch in t)
    assert letters / sum(len(t) for t in prose) > 0.8
    assert all(t.startswith("Q: ") and "\nA: " in t for t in _read_domain(out, "math"))


def _value(expr: str) -> Fraction:
    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            ops = {
                ast.Add: a.__add__,
                ast.Sub: a.__sub__,
                ast.Mult: a.__mul__,
                ast.Div: a.__truediv__,
            }
            return ops[type(node.op)](b)
        raise AssertionError(f"unexpected expression {expr!r}")

    return ev(ast.parse(expr.strip(), mode="eval").body)


_EQUATION = re.compile(r"([\d(][\d +\-*/()]*?) = (\d+(?:/\d+)?)\b")
_FINAL = re.compile(r"The answer is (\d+(?:/\d+)?)%?\.$")
_TEMPLATE_MARKERS = (
    "sells",
    "gives",
    "shared equally",
    "lowest terms",
    r"\d/\d+ of \d",
    "reduced by",
    "percentage",
    "Solve for x",
    "Compute",
    "km per hour",
    "mean score",
    "rectangular garden",
    "minutes are there",
    "squared",
)


def test_math_answers_are_correct(built):
    out, _ = built
    problems = _read_domain(out, "math")
    kinds = set()
    for text in problems:
        question, answer = text.split("\nA: ")
        steps = _EQUATION.findall(answer)
        assert steps, text
        for expr, value in steps:  # every "arithmetic = value" step is exact
            assert _value(expr) == Fraction(value), (expr, value, text)
        final = _FINAL.search(answer)
        assert final, text
        assert Fraction(final.group(1)) == Fraction(steps[-1][1]), text
        kinds.update(m for m in _TEMPLATE_MARKERS if re.search(m, question))
        shop = re.search(r"sells (\d+) \w+ at (\d+) dollars each", question)
        if shop:  # independent check from the question alone
            assert int(final.group(1)) == int(shop.group(1)) * int(shop.group(2))
        eq = re.fullmatch(r"Q: Solve for x: (\d+)x ([+-]) (\d+) = (\d+)\.", question)
        if eq:
            a, op, b, c = int(eq[1]), eq[2], int(eq[3]), int(eq[4])
            x = Fraction(final.group(1))
            assert a * x + (b if op == "+" else -b) == c, text
    assert len(kinds) >= 10, kinds  # several templates


def test_records_are_consistent(built):
    out, _ = built
    records = _read_domain(out, "records")
    headers = set()
    n_json = 0
    for text in records:
        if text.startswith("{"):
            obj = json.loads(text)
            n_json += 1
            if "order_id" in obj:
                cents = [round(Fraction(it["line_total"]) * 100) for it in obj["items"]]
                assert Fraction(obj["total"]) * 100 == sum(cents)
            else:
                assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", obj["birth_date"])
        else:
            rows = list(csv.reader(io.StringIO(text)))
            headers.add(tuple(rows[0]))
            assert len({len(r) for r in rows}) == 1
            if rows[0][0] == "date":  # bank statement: running balance
                for prev, row in zip(rows[1:], rows[2:]):
                    assert Fraction(prev[4]) + Fraction(row[3]) == Fraction(row[4])
    assert 0 < n_json < len(records)
    assert len(headers) == 2  # one schema per CSV kind


def test_same_seed_same_files_other_seed_differs(built, tmp_path):
    out, stats = built
    again = build_demo_corpus(tmp_path / "a", scale=SCALE, seed=0)
    assert again == stats
    for domain in DOMAINS:
        for path in (out / domain).glob("*.jsonl"):
            assert (tmp_path / "a" / domain / path.name).read_bytes() == path.read_bytes()
    build_demo_corpus(tmp_path / "b", scale=SCALE, seed=1)
    for domain in ("math", "records"):
        assert _read_domain(tmp_path / "b", domain) != _read_domain(out, domain)


def test_real_stdlib_walk_skips_tests_and_tools():
    files = corpus.stdlib_python_files(corpus.default_stdlib_dir())
    assert len(files) > 100
    root = corpus.default_stdlib_dir()
    for path in files:
        parts = path.relative_to(root).parts[:-1]
        assert not set(parts) & {"test", "tests", "idlelib", "lib2to3", "site-packages"}, path


def _fake_stdlib(root: Path, *, with_tests: bool) -> Path:
    real = corpus.default_stdlib_dir()
    root.mkdir()
    for name in ("argparse.py", "textwrap.py", "fractions.py", "string.py"):
        shutil.copy(real / name, root / name)
    shutil.copytree(real / "json", root / "json", ignore=shutil.ignore_patterns("__pycache__"))
    if with_tests:
        for sub in ("test", "json/tests", "idlelib", "site-packages/pkg"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub / "marker_mod.py").write_text(
                'def marker_function():\n    """MARKER_DOC ' + "word " * 40 + '"""\n',
                encoding="utf-8",
            )
    return root


def test_builds_when_test_package_is_missing(tmp_path, monkeypatch):
    fake = _fake_stdlib(tmp_path / "lib", with_tests=False)
    assert not (fake / "test").exists()
    monkeypatch.setattr(corpus, "default_stdlib_dir", lambda: fake)
    stats = build_demo_corpus(tmp_path / "out", scale=SCALE, seed=0)
    for domain in DOMAINS:
        assert stats[domain]["documents"] > 0, stats
    code = "\n".join(_read_domain(tmp_path / "out", "code"))
    assert "ArgumentParser" in code or "JSONDecoder" in code or "TextWrapper" in code


def test_skipped_folders_are_never_read(tmp_path):
    fake = _fake_stdlib(tmp_path / "lib", with_tests=True)
    names = {p.relative_to(fake).as_posix() for p in corpus.stdlib_python_files(fake)}
    assert "argparse.py" in names and "json/decoder.py" in names
    assert not any("marker_mod" in n for n in names)
    build_demo_corpus(tmp_path / "out", scale=0.2, seed=0, stdlib_dir=fake)  # reads it all
    for domain in ("code", "prose"):
        assert not any("MARKER" in t for t in _read_domain(tmp_path / "out", domain))


def test_missing_stdlib_folder_gives_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="code"):
        build_demo_corpus(tmp_path / "out", scale=SCALE, stdlib_dir=tmp_path / "nowhere")


def test_split_code_keeps_all_lines_and_bounds_size():
    source = (corpus.default_stdlib_dir() / "argparse.py").read_text(encoding="utf-8")
    chunks = corpus.split_code(source)
    assert len(chunks) > 10
    assert all(0 < len(c.encode("utf-8")) <= MAX_DOC_BYTES for c in chunks)
    kept = [line for c in chunks for line in c.split("\n") if line.strip()]
    assert kept == [line for line in source.split("\n") if line.strip()]
    assert corpus.split_code("def f(:\n") == []
    small = "def small_function():\n    return 'a small file is one document'\n"
    assert corpus.split_code(small) == [small.rstrip("\n")]


@pytest.mark.parametrize("scale", [0, -1.0, float("nan")])
def test_bad_scale(tmp_path, scale):
    with pytest.raises(ValueError):
        build_demo_corpus(tmp_path, scale=scale)


def test_refuses_to_mix_with_other_jsonl(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "mine.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(FileExistsError):
        build_demo_corpus(tmp_path, scale=SCALE)
