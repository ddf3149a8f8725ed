"""metrics.jsonl: typed records, one JSON object per line, also sent to the experiment trackers
(ddk.trackers).

The trainer writes the records below and `ddk report` reads them back through `parse_record`,
so both sides share one definition of every field:

    StepRecord    a training-step log (every trainer.log_every steps; no "event" key)
    EvalRecord    "domain_update" (each interval's evaluation, weights and plan) or
                  "final_eval" (the held-out test split at the end), per domain a DomainStats
    SkippedStep   "skipped_step": a step whose loss or gradient was NaN/inf

"benchmark_eval" records (lm-eval scores, ddk.harness) are plain dicts that the harness writes
and the report reads (reporting only: nothing steers by them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# Event names of metrics.jsonl records (training-step records carry no "event").
DOMAIN_UPDATE = "domain_update"
FINAL_EVAL = "final_eval"
SKIPPED_STEP = "skipped_step"
BENCHMARK_EVAL = "benchmark_eval"  # lm-eval scores (ddk.harness), reporting only
BENCHMARKS_FORMAT = "ddk.benchmarks"  # RUN/benchmarks.json and `ddk eval --out` files
EVAL_EVENTS = (DOMAIN_UPDATE, FINAL_EVAL)


def json_number(value) -> float | None:
    """A JSON number as float (None for anything else: a bool, a string, a missing key)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int(value) -> int | None:
    number = json_number(value)
    return int(number) if number is not None else None


@dataclass
class DomainStats:
    """One domain of an evaluation record."""

    student_ppl: float | None
    teacher_ppl: float | None = None  # None: the run has no teacher
    ratio: float | None = None  # student_ppl / teacher_ppl
    weight: float | None = None  # the sampling weight r of the interval that starts here
    rows: int | None = None  # domain_update: sequences planned for the interval
    epochs: int | None = None  # domain_update: passes through its training data so far
    student_before_ppl: float | None = None  # final_eval: the student before training

    @classmethod
    def from_json(cls, raw: dict) -> DomainStats:
        floats = {f.name: json_number(raw.get(f.name)) for f in fields(cls)}
        return cls(**{**floats, "rows": _int(raw.get("rows")), "epochs": _int(raw.get("epochs"))})

    def best_ratio(self) -> float | None:
        """The logged ratio, or student/teacher when only the perplexities were logged."""
        if self.ratio is not None:
            return self.ratio
        s, t = self.student_ppl, self.teacher_ppl
        return s / t if s is not None and t is not None and t > 0 else None


# Which optional DomainStats fields each evaluation event writes.
_DOMAIN_FIELDS = ("student_ppl", "teacher_ppl", "ratio", "weight")
_EVENT_FIELDS = {DOMAIN_UPDATE: ("rows", "epochs"), FINAL_EVAL: ("student_before_ppl",)}


@dataclass
class EvalRecord:
    event: str  # DOMAIN_UPDATE or FINAL_EVAL
    step: int
    interval: int
    domains: dict[str, DomainStats]
    eval_seconds: float | None = None  # domain_update: time the evaluation took
    split: str | None = None  # final_eval: the held-out split of the numbers
    targets: str | None = None  # chat data: which targets the perplexities count (None: all)

    def to_json(self) -> dict:
        keep = _DOMAIN_FIELDS + _EVENT_FIELDS[self.event]
        out = {
            "event": self.event,
            "step": self.step,
            "interval": self.interval,
            "domains": {n: {k: getattr(d, k) for k in keep} for n, d in self.domains.items()},
        }
        if self.event == DOMAIN_UPDATE:
            out["eval_seconds"] = self.eval_seconds
        else:
            out["split"] = self.split
        if self.targets is not None:
            out["targets"] = self.targets
        return out

    @classmethod
    def from_json(cls, raw: dict) -> EvalRecord:
        domains = {
            str(n): DomainStats.from_json(d)
            for n, d in raw["domains"].items()
            if isinstance(d, dict)
        }
        split, targets = raw.get("split"), raw.get("targets")
        return cls(
            event=raw["event"],
            step=_int(raw.get("step")) or 0,
            interval=_int(raw.get("interval")) or 0,
            domains=domains,
            eval_seconds=json_number(raw.get("eval_seconds")),
            split=split if isinstance(split, str) else None,
            targets=targets if isinstance(targets, str) else None,
        )


@dataclass
class StepRecord:
    step: int
    tokens: int
    lr: float
    loss: float | None  # per target token over the step's global batch
    ce: float | None
    kl: float | None  # the divergence term, unweighted
    grad_norm: float | None
    skipped: bool
    tokens_per_s: float | None
    bad_steps: int  # NaN/inf steps skipped so far
    peak_mem_gib: float | None = None  # CUDA only: this rank's peak

    def to_json(self) -> dict:
        out = asdict(self)
        if self.peak_mem_gib is None:
            del out["peak_mem_gib"]
        return out

    @classmethod
    def from_json(cls, raw: dict) -> StepRecord:
        return cls(
            step=_int(raw["step"]),
            tokens=_int(raw.get("tokens")),
            lr=json_number(raw.get("lr")),
            loss=json_number(raw.get("loss")),
            ce=json_number(raw.get("ce")),
            kl=json_number(raw.get("kl")),
            grad_norm=json_number(raw.get("grad_norm")),
            skipped=raw.get("skipped") is True,
            tokens_per_s=json_number(raw.get("tokens_per_s")),
            bad_steps=_int(raw.get("bad_steps")),
            peak_mem_gib=json_number(raw.get("peak_mem_gib")),
        )


@dataclass
class SkippedStep:
    step: int
    loss: float
    grad_norm: float
    in_a_row: int

    def to_json(self) -> dict:
        return {"event": SKIPPED_STEP, **asdict(self)}


Record = StepRecord | EvalRecord | SkippedStep


def parse_record(raw) -> Record | None:
    """A metrics.jsonl line's record, read leniently (a missing or mistyped number is None);
    None for what is not a record ddk writes."""
    if not isinstance(raw, dict):
        return None
    event = raw.get("event")
    if event in EVAL_EVENTS and isinstance(raw.get("domains"), dict):
        return EvalRecord.from_json(raw)
    if event is None and json_number(raw.get("step")) is not None:
        return StepRecord.from_json(raw)
    if event == SKIPPED_STEP and json_number(raw.get("step")) is not None:
        loss, norm = json_number(raw.get("loss")), json_number(raw.get("grad_norm"))
        return SkippedStep(_int(raw["step"]), loss, norm, _int(raw.get("in_a_row")))
    return None


def read_metrics(path: str | Path) -> list[dict]:
    records = []
    # Undecodable bytes (a binary file put there) become lines that are not JSON, skipped.
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except (ValueError, RecursionError):
                continue  # a line cut short by a crash, or not ddk's
    return records


def read_records(path: str | Path) -> list[Record]:
    """The typed records of a metrics.jsonl (lines ddk did not write are left out)."""
    return [r for r in map(parse_record, read_metrics(path)) if r is not None]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep what a run had logged up to checkpoint `step`; later lines are redone on resume.
    Evaluations at `step` itself (domain_update, final_eval, benchmark_eval) come after that
    checkpoint, so they go too; a step's own log and skipped_step record come before it and
    stay."""
    if not path.exists():
        return
    redone = (*EVAL_EVENTS, BENCHMARK_EVAL)
    kept = [
        r
        for r in read_metrics(path)
        if r.get("step", 0) < step or (r.get("step") == step and r.get("event") not in redone)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class MetricsWriter:
    """Appends records to metrics.jsonl and hands them to the run's trackers (ddk.trackers).
    `trackers` is None off rank 0 and when report_to is empty."""

    def __init__(self, run_dir: Path, trackers=None, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.trackers = trackers if enabled else None

    def write(self, record: Record | dict) -> None:
        """A typed record, or a plain dict for events without a type (benchmark_eval)."""
        if not self.enabled:
            return
        line = record if isinstance(record, dict) else record.to_json()
        with open(self.path, "a") as fh:
            fh.write(json.dumps(line) + "\n")
        if self.trackers is not None:
            self.trackers.log_record(line)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
