"""metrics.jsonl (one JSON record per line), also sent to the experiment trackers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ddk.trackers import Trackers

# Event names of metrics.jsonl records (training-step records carry no "event").
DOMAIN_UPDATE = "domain_update"
FINAL_EVAL = "final_eval"
SKIPPED_STEP = "skipped_step"
BENCHMARK_EVAL = "benchmark_eval"  # lm-eval scores (ddk.harness), reporting only
BENCHMARKS_FORMAT = "ddk.benchmarks"  # RUN/benchmarks.json and `ddk eval --out` files
EVAL_EVENTS = (DOMAIN_UPDATE, FINAL_EVAL)


def read_metrics(path: str | Path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep what a run had logged up to checkpoint `step`; later lines are redone on resume.
    Evaluations at `step` itself (domain_update, final_eval) come after that checkpoint, so they
    go too; a step's own log and skipped_step record come before it and stay."""
    if not path.exists():
        return
    redone = EVAL_EVENTS
    kept = [
        r
        for r in read_metrics(path)
        if r.get("step", 0) < step or (r.get("step") == step and r.get("event") not in redone)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class MetricsWriter:
    """Appends records to metrics.jsonl and hands them to the run's trackers (ddk.trackers).
    `trackers` is None off rank 0 and when report_to is empty."""

    def __init__(self, run_dir: Path, trackers: Trackers | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.trackers = trackers if enabled else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log_record(record)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
