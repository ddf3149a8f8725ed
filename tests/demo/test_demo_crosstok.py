"""`ddk demo --cross-teacher` (`ddk.demo.crosstok`): a teacher with another tokenizer."""

import json

import pytest

from ddk.cli import main
from ddk.demo.crosstok import byte_table, cross_method

TINY = ["--scale", "0.06", "--steps", "10", "--teacher-steps", "20", "--student-steps", "10"]


def test_cross_methods_name_their_mismatch_loss():
    assert cross_method("kd") == ("kd@x", ["teacher.tokenizer=cross"])
    assert cross_method("ddk:skip") == (
        "ddk@x-skip",
        ["teacher.tokenizer=cross", "distill.cross_mismatch=skip"],
    )
    assert cross_method("kd:merge")[1][-1] == "distill.cross_mismatch=merge"


def test_byte_table_has_a_mean_row():
    table = byte_table({"a": {"x": 2.0, "y": 4.0}, "b": {"x": 1.0, "y": 1.0}})
    assert table.splitlines()[-1].split() == ["mean", "3.0000", "1.0000"]


@pytest.mark.slow  # the demo at tiny sizes plus teacher-x: about a minute
def test_demo_distils_through_a_teacher_with_another_tokenizer(tmp_path, capsys):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    argv = ["demo", "--quick", "--out", str(out), "--cache-dir", str(cache), *TINY,
            "--methods", "cpt", "--cross-teacher", "--cross-methods", "kd", "ddk:skip",
            "--no-benchmarks"]  # fmt: skip
    assert main(argv) == 0
    ppl = json.loads((out / "cross_results.json").read_text())
    assert list(ppl) == ["teacher", "student before", "cpt", "kd@x", "ddk@x-skip", "teacher-x"]
    domains = set(ppl["cpt"])
    assert all(set(v) == domains and all(1 < x < 256 for x in v.values()) for v in ppl.values())
    teacher_ppl = json.loads((out / "runs" / "kd@x" / "teacher_ppl.json").read_text())
    assert set(teacher_ppl["ppl"]["val"]) == domains
    assert "Test perplexity PER BYTE" in (out / "results.md").read_text()
    assert "Test perplexity PER BYTE" in capsys.readouterr().out


@pytest.mark.slow  # the tiny demo, teacher-x and the two domain teachers: a few minutes
def test_demo_gives_code_to_teacher_x_and_math_to_the_math_teacher(tmp_path):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    argv = ["demo", "--quick", "--out", str(out), "--cache-dir", str(cache), *TINY,
            "--methods", "cpt", "--cross-teacher", "--cross-methods", "ddk", "--domain-teachers",
            "--no-benchmarks"]  # fmt: skip
    assert main(argv) == 0
    ppl = json.loads((out / "cross_results.json").read_text())
    assert list(ppl) == ["teacher", "student before", "cpt", "ddk@x", "ddk@x+domain", "teacher-x"]
    record = json.loads((out / "runs" / "ddk@x+domain" / "teacher_ppl.json").read_text())
    teachers = record["key"]["teachers"]
    assert teachers["code"].endswith("teacher-x/final")
    assert teachers["math"].endswith("teacher-math/final")
    assert set(record["ppl_byte"]["val"]) == set(ppl["cpt"])
    # code is scored by teacher-x, as in the single-teacher ddk@x run
    alone = json.loads((out / "runs" / "ddk@x" / "teacher_ppl.json").read_text())
    assert record["ppl_byte"]["val"]["code"] == pytest.approx(alone["ppl_byte"]["val"]["code"])
