"""Where benchmark scores go: `ddk eval --tasks` (a table, `--out` JSON) and, inside a run,
`benchmark_eval` records plus RUN/benchmarks.json."""

from __future__ import annotations

import json
from pathlib import Path

from ddk.errors import DDKError
from ddk.fileutil import write_json_atomic
from ddk.harness.score import score, score_or_failure
from ddk.harness.tasks import BenchmarkPlan, check_plan
from ddk.metrics import BENCHMARK_EVAL, BENCHMARKS_FORMAT
from ddk.models import eval_model, eval_tokenizer
from ddk.ranks import print0
from ddk.table import format_table


def benchmarks_payload(model_name: str, record: dict, **extra) -> dict:
    """What `ddk eval --out` (and RUN/benchmarks.json) holds: a format marker, the model, the
    record of `score`."""
    return {
        "format": BENCHMARKS_FORMAT,
        "format_version": 1,
        "model": model_name,
        **extra,
        **record,
    }


def write_benchmarks(path: Path, payload: dict) -> None:
    """Write atomically; a file there that is not a ddk benchmarks file is never replaced."""
    path = Path(path)
    if path.exists():
        try:
            ours = json.loads(path.read_text()).get("format") == BENCHMARKS_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise DDKError(
                f"'{path}' exists and is not a ddk benchmarks file; choose another --out"
            )
    write_json_atomic(path, payload)


def benchmark_rows(record: dict) -> list[list]:
    """Table rows: per task, then per domain (mean) and the average; scores in percent."""

    def pct(value):
        return None if value is None else 100.0 * value

    rows = []
    for name, t in record["tasks"].items():
        shots = (
            t["n_shot"] if not isinstance(t["n_shot"], list) else "/".join(map(str, t["n_shot"]))
        )
        rows.append(
            [
                t["domain"] or "-",
                name,
                t["metric"],
                pct(t["score"]),
                pct(t["stderr"]),
                shots,
                t["samples"],
            ]
        )
    for d, entry in record.get("domains", {}).items():
        rows.append([d, "(mean)", "", pct(entry["score"]), None, "", None])
    rows.append(["all", "(average)", "", pct(record.get("average")), None, "", None])
    return [[("" if c is None else c) for c in row] for row in rows]


BENCHMARK_HEADERS = ["domain", "task", "metric", "score %", "± stderr", "n-shot", "samples"]


def benchmark_model_cli(
    model_name: str,
    section,
    *,
    out: str | None,
    as_json: bool,
    domains: list[str] | None = None,
    loaded: tuple | None = None,
) -> dict:
    """`ddk eval --tasks`: check the tasks, load the model (unless `loaded`), score, print a
    table (or JSON), write the JSON to `out`."""
    plan = BenchmarkPlan.from_section(section)
    check_plan(plan, domains)
    if loaded is not None:
        model, tokenizer = loaded
    else:
        tokenizer = eval_tokenizer(model_name)
        if tokenizer is None:
            raise DDKError(f"'{model_name}' has no tokenizer; benchmarks need one")
        model = eval_model(model_name)
    payload = benchmarks_payload(model_name, score(model, tokenizer, plan))
    if out:
        write_benchmarks(Path(out), payload)
    if as_json:
        print(json.dumps(payload, indent=2))
    else:
        limit = f", limit {plan.limit}" if plan.limit is not None else ""
        print(f"benchmark scores of {model_name} (lm-eval {payload['lm_eval_version']}{limit})")
        print(format_table(BENCHMARK_HEADERS, benchmark_rows(payload)))
        if out:
            print(f"written to {out}")
    return payload


class RunBenchmarks:
    """Scores a run's student in process (rank 0): the final model, and every
    `eval.every_intervals` intervals. Each scoring is a `benchmark_eval` record for metrics.jsonl
    (`{"event", "step", "final", **score's record}`, or `"failed"` instead of the scores) and
    rewrites RUN/benchmarks.json: the latest scores and a `history` of every scoring so far.
    Reporting only: nothing here is read back by the sampler.

    `intervals=False` (DeepSpeed: the whole student is read back from a checkpoint, which
    only the end writes for certain) scores the final model only, and says so once."""

    def __init__(self, section, run_dir: Path, tokenizer, *, intervals: bool = True):
        self.plan = BenchmarkPlan.from_section(section)
        self.every = section.every_intervals if intervals else None
        self.run_dir = Path(run_dir)
        self.tokenizer = tokenizer
        self.runtime = self.metrics = None  # set by for_run
        if section.every_intervals is not None and not intervals:
            print0(
                "note: eval.every_intervals is ignored under DeepSpeed ZeRO (its whole model "
                "is read from a checkpoint); benchmarks score the final model only"
            )

    @classmethod
    def for_run(cls, section, run_dir: Path, tokenizer, runtime, metrics) -> RunBenchmarks | None:
        """A training run's benchmarks (None without eval.tasks), written through `metrics`
        (a MetricsWriter); between intervals too except under DeepSpeed."""
        if not section.tasks:
            return None
        deepspeed = runtime.is_sharded and runtime.backend == "deepspeed"
        run = cls(section, run_dir, tokenizer, intervals=not deepspeed)
        run.runtime, run.metrics = runtime, metrics
        return run

    def record(self, model, step: int, *, final: bool = False, wait: bool = True) -> None:
        """Inside a run: rank 0 scores `model` (whole there) into metrics.jsonl and
        RUN/benchmarks.json; with `wait` the other ranks wait at a barrier (mid-run), else they
        go on (the end: no collective follows, so no process-group timeout applies). A failure
        is a warning and a recorded failure, never a stop."""
        if self.runtime.is_main:
            record = self.score(model, step, final=final, device=self.runtime.device)
            self.metrics.write(record)
        if wait:
            self.runtime.barrier()

    @property
    def enabled(self) -> bool:
        return bool(self.plan.tasks)

    def due(self, interval: int) -> bool:
        """Whether the evaluation that opens `interval` also scores benchmarks."""
        return (
            self.enabled and self.every is not None and interval > 0 and interval % self.every == 0
        )

    def score(self, model, step: int, *, final: bool = False, device=None) -> dict:
        record = score_or_failure(model, self.tokenizer, self.plan, device)
        event = {"event": BENCHMARK_EVAL, "step": step, "final": final, **record}
        self._write_file(event)
        return event

    def _write_file(self, event: dict) -> None:
        path = self.run_dir / "benchmarks.json"
        history = []
        if path.is_file():
            try:
                previous = json.loads(path.read_text())
            except (OSError, ValueError):
                previous = {}
            if previous.get("format") == BENCHMARKS_FORMAT:
                # a resumed run redoes what came after its checkpoint
                history = [h for h in previous.get("history", []) if h["step"] < event["step"]]
        history.append(_history_entry(event))
        model = str(self.run_dir / "final") if event["final"] else f"step {event['step']}"
        payload = benchmarks_payload(model, event, history=history)
        payload.pop("event")
        write_benchmarks(path, payload)


def _history_entry(event: dict) -> dict:
    if "failed" in event:
        return {"step": event["step"], "final": event["final"], "failed": event["failed"]}
    return {
        "step": event["step"],
        "final": event["final"],
        "average": event["average"],
        "domains": {d: e["score"] for d, e in event["domains"].items()},
        "tasks": {t: e["score"] for t, e in event["tasks"].items()},
    }
