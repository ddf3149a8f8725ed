"""Named corpus shapes (ddk.demo.corpora): sizes as the shape says, shared sources, a clear line
when this Python lacks a source, determinism, the command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ddk.demo import corpora
from ddk.demo.corpora import SHAPES, SOURCES, Shape, SourceUnavailable, build_corpus, han_cipher

SCALE = 0.05  # unbalanced: 255 word problems, 22 + 22 prose, 2 + 2 code documents


def _read(root: Path, domain: str) -> list[str]:
    path = root / domain / corpora.FILE_NAME
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def unbalanced(tmp_path_factory):
    root = tmp_path_factory.mktemp("unbalanced")
    logged: list[str] = []
    stats = build_corpus("unbalanced", root, seed=0, scale=SCALE, log=logged.append)
    return root, stats, logged


def test_unbalanced_has_the_shape_it_names(unbalanced):
    root, stats, logged = unbalanced
    want = SHAPES["unbalanced"].counts(SCALE)
    if not logged:  # else a source this Python lacks was replaced (a line says which)
        assert {d: s["documents"] for d, s in stats.items()} == want
    assert [s["documents"] for s in stats.values()] == list(want.values())
    for domain, s in stats.items():
        texts = _read(root, domain)
        assert len(texts) == s["documents"] and all(t.strip() for t in texts)
        assert sum(len(t.encode("utf-8")) for t in texts) == s["bytes"]
    full = SHAPES["unbalanced"].counts()
    shares = {d: n / sum(full.values()) for d, n in full.items()}
    assert shares["math"] >= 0.8
    assert sorted(d for d, s in shares.items() if 0.05 <= s <= 0.09) == ["han", "prose"]
    assert sorted(d for d, s in shares.items() if s < 0.01) == ["c", "tcl"]
    sources_md = (root / "SOURCES.md").read_text()
    assert "--shape unbalanced --seed 0 --scale 0.05" in sources_md
    for domain in stats:
        assert f"| `{domain}` |" in sources_md


def test_no_two_domains_share_a_document(unbalanced):
    root, stats, _ = unbalanced
    seen: dict[str, str] = {}
    for domain in stats:
        for text in _read(root, domain):
            assert seen.setdefault(text, domain) == domain


def test_han_prose_has_no_latin_letters_and_a_fixed_cipher(unbalanced):
    root, _, _ = unbalanced
    for text in _read(root, "han"):
        assert not re.search(r"[A-Za-z]", text) and " " not in text
    assert han_cipher("Read the file, then read it again.") == han_cipher(
        "read THE file, then READ it again."
    )
    out = han_cipher("Call f(x) 3 times: done.")
    assert "3" in out and "（" in out and out.endswith("。") and not re.search(r"[a-z]", out)


def test_same_seed_same_corpus_other_seed_other_documents(tmp_path, unbalanced):
    root, stats, _ = unbalanced
    build_corpus("unbalanced", tmp_path / "again", seed=0, scale=SCALE, log=lambda m: None)
    for domain in stats:
        assert _read(tmp_path / "again", domain) == _read(root, domain)
    build_corpus("unbalanced", tmp_path / "other", seed=1, scale=SCALE, log=lambda m: None)
    assert set(_read(tmp_path / "other", "math")) != set(_read(root, "math"))


def test_a_missing_source_falls_back_with_one_line(tmp_path, monkeypatch):
    """No C headers (a Python without its -dev files): the C domain becomes the first fallback
    the shape does not hold yet (Tcl is there already, so Python), and one line says so."""
    monkeypatch.setattr(corpora, "c_header_dirs", lambda: [tmp_path / "no-include"])
    logged: list[str] = []
    stats = build_corpus("unbalanced", tmp_path / "c", scale=SCALE, log=logged.append)
    assert (
        "c" not in stats and stats["python"]["documents"] == SHAPES["unbalanced"].counts(SCALE)["c"]
    )
    assert len(logged) == 1
    assert "no C headers in" in logged[0] and "using 'python' instead of 'c'" in logged[0]


def test_no_source_and_no_fallback_is_one_error(tmp_path, monkeypatch, capsys):
    def missing(n, ctx):
        raise SourceUnavailable("no such files here")

    monkeypatch.setitem(SOURCES, "tcl", corpora.Source(missing, "Tcl", fallbacks=("c",)))
    monkeypatch.setitem(SOURCES, "c", corpora.Source(missing, "C", fallbacks=()))
    shape = Shape("two code domains", {"math": 5, "tcl": 2})
    with pytest.raises(SourceUnavailable, match="no such files here.*no fallback of 'tcl'"):
        build_corpus(shape, tmp_path / "x", log=lambda m: None)
    monkeypatch.setitem(SHAPES, "broken", shape)
    assert corpora.main(["--shape", "broken", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no such files here")


def test_shares_and_counts(tmp_path):
    shape = Shape("shares", {"math": 0.75, "prose": 0.25, "python": 3}, documents=40)
    assert shape.counts() == {"math": 30, "prose": 10, "python": 3}
    assert shape.counts(0.1) == {"math": 3, "prose": 1, "python": 1}  # at least one each


def test_command_lists_and_builds(tmp_path, capsys):
    assert corpora.main(["--list"]) == 0
    assert "unbalanced:" in capsys.readouterr().out
    out = tmp_path / "corpus"
    argv = ["--shape", "unbalanced", "--out", str(out), "--scale", str(SCALE)]
    assert corpora.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "math" in printed
    assert len(list(out.glob("*/part-00000.jsonl"))) == len(SHAPES["unbalanced"].domains)
    assert (out / "SOURCES.md").is_file()
