"""metrics.jsonl (one JSON record per line) and, optionally, TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path

# Event names of metrics.jsonl records (training-step records carry no "event").
DOMAIN_UPDATE = "domain_update"
FINAL_EVAL = "final_eval"
SKIPPED_STEP = "skipped_step"
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
    def __init__(
        self,
        run_dir: Path,
        report_to: list[str],
        enabled: bool = True,
        purge_step: int | None = None,
    ):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if enabled and "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("warning: report_to has tensorboard but it is not installed; skipping it")
            else:
                # purge_step drops points a crashed run logged past the resumed checkpoint.
                self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            if record.get("event") in EVAL_EVENTS:
                for name, d in record["domains"].items():
                    for key in ("student_ppl", "teacher_ppl", "weight", "ratio"):
                        if d.get(key) is not None:
                            self._tb.add_scalar(f"{key}/{name}", d[key], step)
            else:
                for key, value in record.items():
                    if key != "step" and isinstance(value, int | float):
                        self._tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
