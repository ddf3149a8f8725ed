"""Benchmarks inside `ddk distill` (eval.tasks): the student in memory scored through lm-eval
every eval.every_intervals intervals and at the end, into metrics.jsonl and RUN/benchmarks.json;
`ddk report` shows them as the paper's table; a 2-process run scores once; a resume redoes the
scorings after its checkpoint."""

from __future__ import annotations

import json
import random

import pytest

from ddk.cli import main
from ddk.metrics import read_metrics, truncate_metrics
from ddk.table import fmt_cell
from tests.conftest import run_config, write_config
from tests.test_report import table_row
from tests.test_sharding import FSDP_ENV, _env, _torchrun, needs_torchrun

pytest.importorskip("lm_eval")

from tests.test_harness import choice_task, words  # noqa: E402

LIMIT = 6


def distill_config(tmp_path, teacher_dir, student_dir, prepared_dir, **overrides) -> str:
    """A TINY_RUN (12 steps, K=3: intervals at 0, 3, 6, 9) scoring a local multiple-choice
    task of the prose domain every 2 intervals and at the end."""
    rng = random.Random(7)
    items = [
        {"context": words(rng, 4), "choices": [words(rng, 2) for _ in range(3)], "label": 0}
        for _ in range(10)
    ]
    folder = choice_task(tmp_path / "tasks", "prose_choice", items)
    values = run_config(
        tmp_path / "run",
        teacher_dir,
        student_dir,
        prepared_dir,
        **{
            "eval.tasks": {"prose": ["prose_choice"]},
            "eval.include_path": [str(folder)],
            "eval.limit": LIMIT,
            "eval.every_intervals": 2,
            **overrides,
        },
    )
    return write_config(tmp_path / "run.yaml", values)


def benchmark_events(run) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "benchmark_eval"]


@pytest.mark.slow
def test_distill_scores_benchmarks_and_report_shows_the_table(
    tmp_path, teacher_dir, student_dir, prepared_dir
):
    cfg = distill_config(tmp_path, teacher_dir, student_dir, prepared_dir)
    assert main(["distill", cfg]) == 0
    run = tmp_path / "run"
    events = benchmark_events(run)
    # intervals 2 (step 6) and the final model (step 12); interval 0 is the untrained student
    assert [(e["step"], e["final"]) for e in events] == [(6, False), (12, True)]
    for e in events:
        task = e["tasks"]["prose_choice"]
        assert task["domain"] == "prose" and task["samples"] == LIMIT and task["limit"] == LIMIT
        assert 0.0 <= task["score"] <= 1.0 and task["stderr"] is not None
        assert task["n_shot"] == 0 and task["version"] is not None and e["lm_eval_version"]
    saved = json.loads((run / "benchmarks.json").read_text())
    assert saved["format"] == "ddk.benchmarks" and saved["model"] == str(run / "final")
    assert saved["tasks"] == events[-1]["tasks"]
    assert [h["step"] for h in saved["history"]] == [6, 12]

    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out)]) == 0
    md = (out / "summary.md").read_text()
    assert "## Benchmark scores (lm-eval)" in md
    row = table_row(md, "ddk", header="average")
    assert row["prose_choice (prose)"] == fmt_cell(
        100 * events[-1]["tasks"]["prose_choice"]["score"]
    )
    assert row["average"] == fmt_cell(100 * events[-1]["average"])
    assert (out / "benchmarks_over_training.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
@needs_torchrun
@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_two_process_run_logs_once_and_scores_once(
    backend, tmp_path, teacher_dir, student_dir, prepared_dir
):
    """Over gloo, rank 0 scores the whole student (DDP: its own copy; FSDP2: one gathered by
    every rank) while rank 1 waits; one record per scoring."""
    cfg = distill_config(
        tmp_path,
        teacher_dir,
        student_dir,
        prepared_dir,
        **{"trainer.micro_batch_size": 2, "trainer.max_steps": 6, "eval.every_intervals": 1},
    )
    done = _torchrun(["distill", cfg], _env(**(FSDP_ENV if backend == "fsdp2" else {})))
    events = benchmark_events(tmp_path / "run")
    assert [(e["step"], e["final"]) for e in events] == [(3, False), (6, True)]
    updates = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "event" in r]
    assert [r["event"] for r in updates].count("domain_update") == 2  # logged once, too
    assert "benchmark evaluation failed" not in done.stdout + done.stderr


def test_resume_redoes_benchmark_records_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 4, "loss": 1.0},
        {"event": "benchmark_eval", "step": 3, "final": False, "tasks": {}},
        {"event": "benchmark_eval", "step": 6, "final": False, "tasks": {}},
        {"event": "benchmark_eval", "step": 8, "final": False, "failed": "OSError: x"},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    truncate_metrics(path, 6)  # the scoring at the checkpoint's step comes after it
    assert [(r.get("event"), r["step"]) for r in read_metrics(path)] == [
        (None, 4),
        ("benchmark_eval", 3),
    ]
