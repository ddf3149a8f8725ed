"""The corpus shapes for choosing a DDK setting (skewed7, near_dup6 in ddk.demo.corpora) and
benchmarks/sweep_bases.py, which turns a shape into a base for benchmarks/method_sweep.py."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from ddk.demo.corpora import FILE_NAME, SHAPES, build_corpus
from ddk.demo.run import DemoSize

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = sys.modules.setdefault(name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


def _read(root: Path, domain: str) -> list[str]:
    lines = (root / domain / FILE_NAME).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def _word_counts(texts: list[str]) -> Counter:
    return Counter(w.lower() for t in texts for w in re.findall(r"[A-Za-z]{3,}", t))


def _cosine(a: Counter, b: Counter) -> float:
    dot = sum(n * b[w] for w, n in a.items())
    return dot / math.sqrt(sum(n * n for n in a.values()) * sum(n * n for n in b.values()))


# code7's and lag6's sizes are 8x apart (500 documents down to 60), the others' 10x or more
@pytest.mark.parametrize(
    "shape, n, spread",
    [("skewed7", 7, 10), ("near_dup6", 6, 10), ("wide8", 8, 10), ("han7", 7, 10), ("code7", 7, 8),
     ("lag6", 6, 8)],
)  # fmt: skip
def test_sweep_shapes_more_domains_unequal_sizes_no_shared_documents(tmp_path, shape, n, spread):
    stats = build_corpus(shape, tmp_path, seed=0, scale=0.1, log=lambda m: None)
    assert len(stats) == n
    seen: dict[str, str] = {}
    for domain in stats:
        for text in _read(tmp_path, domain):
            assert seen.setdefault(text, domain) == domain
    counts = SHAPES[shape].counts()
    assert max(counts.values()) >= spread * min(counts.values())


def test_near_dup6_docstrings_nearly_duplicate_prose(tmp_path):
    stats = build_corpus("near_dup6", tmp_path, seed=0, scale=0.2, log=lambda m: None)
    words = {d: _word_counts(_read(tmp_path, d)) for d in stats}
    similarity = {d: _cosine(words["docstrings"], words[d]) for d in stats if d != "docstrings"}
    assert max(similarity, key=similarity.get) == "prose"
    assert similarity["prose"] > 0.8  # the others: math 0.65 (word problems), python 0.3
    assert all(v < 0.75 for d, v in similarity.items() if d != "prose")


def test_students_never_see_some_domain_of_each_shape():
    bases = _script("sweep_bases")
    for shape, mix in bases.STUDENT_MIXES.items():
        assert set(mix) < set(SHAPES[shape].domains), shape
        assert abs(sum(mix.values()) - 1) < 1e-9


TINY = DemoSize(
    scale=1.0, vocab=300, seq_len=32, val_sequences=2, teacher_steps=2, student_steps=2,
    distill_steps=2, K=1, batch=2,
)  # fmt: skip


@pytest.mark.slow
def test_a_shape_base_runs_through_the_sweep(tmp_path, capsys):
    bases, sweep = _script("sweep_bases"), _script("method_sweep")
    base = tmp_path / "base"
    config = bases.build_base("near_dup6", base, TINY, seed=0, scale=0.05)
    assert config == base / "configs" / "distill_ddk.yaml"
    assert (base / "teacher" / "final").is_dir() and (base / "student" / "final").is_dir()
    built = (base / "student" / "final").stat().st_mtime
    assert bases.build_base("near_dup6", base, TINY, seed=0, scale=0.05) == config
    assert (base / "student" / "final").stat().st_mtime == built  # reused, not rebuilt
    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--base", str(base), "--inprocess", "--settings", "robust", "equal"]
    assert sweep.main(argv) == 0
    numbers = sweep.run_numbers(out / "runs" / "robust" / "base")
    assert numbers["split"] == "test" and len(numbers["ppl"]) == 6
    assert "robust" in capsys.readouterr().out
