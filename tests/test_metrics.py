"""metrics.jsonl records: what the trainer writes is what the report reads back, and the
reader is lenient with lines ddk did not write."""

import json

from ddk.metrics import (
    DOMAIN_UPDATE,
    FINAL_EVAL,
    DomainStats,
    EvalRecord,
    MetricsWriter,
    SkippedStep,
    StepRecord,
    parse_record,
    read_records,
)


def _records():
    update = EvalRecord(
        DOMAIN_UPDATE,
        3,
        1,
        {"a": DomainStats(12.0, 10.0, 1.2, 0.6, rows=8, epochs=1)},
        eval_seconds=0.5,
    )
    final = EvalRecord(
        FINAL_EVAL, 6, 2, {"a": DomainStats(11.0, 10.0, 1.1, 0.6, student_before_ppl=30.0)}
    )
    final.split = "test"
    step = StepRecord(4, 512, 1e-3, 2.5, 2.0, 2.5, 0.7, False, 1000.0, 0)
    return [update, final, step, SkippedStep(5, float("nan"), float("inf"), 1)]


def test_records_round_trip_through_metrics_jsonl(tmp_path):
    writer = MetricsWriter(tmp_path)
    for record in _records():
        writer.write(record)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert list(lines[0]) == ["event", "step", "interval", "domains", "eval_seconds"]
    assert list(lines[0]["domains"]["a"]) == [
        "student_ppl", "teacher_ppl", "ratio", "weight", "rows", "epochs",
    ]  # fmt: skip
    assert (
        list(lines[1]["domains"]["a"])[-1] == "student_before_ppl" and lines[1]["split"] == "test"
    )
    assert "event" not in lines[2] and "peak_mem_gib" not in lines[2]
    assert lines[3]["event"] == "skipped_step"
    update, final, step, skipped = read_records(tmp_path / "metrics.jsonl")
    assert update == _records()[0] and final == _records()[1] and step == _records()[2]
    assert (skipped.step, skipped.in_a_row) == (5, 1)


def test_the_reader_leaves_out_or_blanks_what_ddk_did_not_write():
    assert parse_record([1, 2, 3]) is None and parse_record({"event": "mine"}) is None
    odd = parse_record(
        {"event": FINAL_EVAL, "step": 2, "domains": {"a": "x", "b": {"weight": "?"}}}
    )
    assert list(odd.domains) == ["b"] and odd.domains["b"].weight is None
    assert parse_record({"step": True}) is None  # a bool is not a step
    assert DomainStats(12.0, 4.0).best_ratio() == 3.0  # from the perplexities when not logged
