"""`ddk report` with benchmark scores: the paper's table (a row per model, a column per task
grouped by domain, the average, beside perplexity and worst ratio) and scores over training."""

from __future__ import annotations

import random

import pytest

from ddk.cli import main
from ddk.config import EvalSection
from ddk.demo.build import tiny_causal_lm
from ddk.metrics import MetricsWriter
from ddk.table import fmt_cell
from tests.test_report import AFTER, table_row, write_run

pytest.importorskip("lm_eval")

from ddk.harness import RunBenchmarks, benchmarks_payload, score, write_benchmarks  # noqa: E402
from tests.test_harness import choice_task, words  # noqa: E402


def write_choice_task(folder, name, seed):
    rng = random.Random(seed)
    items = [
        {"context": words(rng, 4), "choices": [words(rng, 2) for _ in range(3)], "label": 1}
        for _ in range(12)
    ]
    choice_task(folder, name, items)


@pytest.fixture(scope="module")
def scored_runs(tmp_path_factory, tokenizer_dir):
    """Two run folders whose metrics.jsonl hold benchmark_eval records of real scorings (at
    step 60 and at the end), and a reference file for the teacher."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("report_benchmarks")
    tasks = root / "tasks"
    write_choice_task(tasks, "code_task", 0)
    write_choice_task(tasks, "math_task", 1)
    section = EvalSection(
        tasks={"code": ["code_task"], "math": ["math_task"]}, include_path=[str(tasks)]
    )
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    runs, events = [], {}
    for seed, method in enumerate(["kd", "ddk"]):
        run = write_run(root / f"run_{method}", method, AFTER[method])
        model = tiny_causal_lm(len(tok), hidden_size=32, num_heads=2, seed=10 + seed)
        metrics = MetricsWriter(run)
        events[method] = [
            RunBenchmarks(section, run, tok).score(model, step, final=step == 100)
            for step in (60, 100)
        ]
        for event in events[method]:
            metrics.write(event)
        runs.append(run)
    teacher = tiny_causal_lm(len(tok), hidden_size=32, num_heads=2, seed=20)
    reference = root / "teacher.json"
    record = score(teacher, tok, RunBenchmarks(section, root, tok).plan)
    write_benchmarks(reference, benchmarks_payload("tiny-teacher", record))
    return runs, events, reference, record


def test_paper_style_table_and_scores_over_training(scored_runs, tmp_path):
    runs, events, reference, teacher = scored_runs
    out = tmp_path / "report"
    argv = ["report", *map(str, runs), "--out", str(out), "--benchmarks", str(reference)]
    assert main(argv) == 0
    md = (out / "summary.md").read_text()
    for method in ("kd", "ddk"):
        final = events[method][-1]
        row = table_row(md, method, header="average")
        assert row["code_task (code)"] == fmt_cell(100 * final["tasks"]["code_task"]["score"])
        assert row["math_task (math)"] == fmt_cell(100 * final["tasks"]["math_task"]["score"])
        assert row["average"] == fmt_cell(100 * final["average"])
        assert row["val geo-mean ppl"] != "" and row["worst ratio"].endswith("(math)")
    ref = table_row(md, "tiny-teacher", header="average")
    assert ref["average"] == fmt_cell(100 * teacher["average"]) and ref["worst ratio"] == ""
    headers = md.split("## Benchmark scores (lm-eval)")[1].splitlines()[2]
    assert headers.index("code_task (code)") < headers.index("math_task (math)")  # data order
    assert (out / "benchmarks_over_training.png").read_bytes().startswith(b"\x89PNG")
    page = (out / "report.html").read_text()
    assert "Benchmark scores (lm-eval)" in page and "Benchmark scores over training" in page


def test_no_benchmarks_no_table_and_a_failure_is_noted(tmp_path):
    plain = write_run(tmp_path / "run_kd", "kd", AFTER["kd"])
    out = tmp_path / "report"
    assert main(["report", str(plain), "--out", str(out)]) == 0
    assert "Benchmark scores" not in (out / "summary.md").read_text()
    assert not (out / "benchmarks_over_training.png").exists()
    MetricsWriter(plain).write(
        {"event": "benchmark_eval", "step": 100, "final": True, "failed": "OSError: disk full"}
    )
    assert main(["report", str(plain), "--out", str(out)]) == 0  # replaces its own report
    md = (out / "summary.md").read_text()
    assert "Benchmark scores" not in md  # nothing was scored: no table
    assert "the benchmark evaluation at step 100 failed (OSError: disk full)" in md


def test_a_benchmark_file_that_is_not_ddks_is_refused(tmp_path, capsys):
    plain = write_run(tmp_path / "run_kd", "kd", AFTER["kd"])
    notes = tmp_path / "notes.json"
    notes.write_text('{"accuracy": 0.5}')
    assert main(["report", str(plain), "--benchmarks", str(notes)]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert "is not a ddk benchmarks file" in line
    assert not (plain / "report").exists()
