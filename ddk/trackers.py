"""Experiment trackers (TensorBoard, W&B, MLflow, ...) through Accelerate's tracker API.

The run's records (what metrics.jsonl holds) are turned into flat scalars under stable names and
handed to the same `GeneralTracker` classes `Accelerator(log_with=...).init_trackers(...)`
builds: `start()`, `store_init_configuration(resolved config)`, `log(values, step)`, `finish()`.
ddk builds each tracker itself rather than through `Accelerator.init_trackers` so that one
tracker that is not installed or fails (no login, no server) costs one warning line and is
dropped, while the run and the other trackers go on. Only rank 0 creates trackers.

Metric names (stable; `<d>` is a domain, `<task>` an lm-eval task):

    train/<key>                  training records: loss, ce, kl, lr, tokens, tokens_per_s, ...
    train/skipped_step           1 at a step skipped for a NaN/inf loss or gradient
    weight/<d>                   the domain weight the next interval samples by
    student_ppl/<d>, teacher_ppl/<d>, ratio/<d>   validation perplexities and their ratio
    rows/<d>, epochs/<d>         sequences drawn for the next interval; epochs of <d> so far
    <split>/student_ppl/<d>, <split>/teacher_ppl/<d>, <split>/ratio/<d>,
    <split>/student_before_ppl/<d>   the final evaluation (split: test, or val without one)
    benchmark/<task>             a task's score (its primary metric), benchmark/<task>/stderr
    benchmark/domain/<d>         mean score of the tasks mapped to <d>; benchmark/average
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

from ddk.errors import first_line
from ddk.metrics import BENCHMARK_EVAL, DOMAIN_UPDATE, FINAL_EVAL, SKIPPED_STEP

# Per-domain values of domain_update / final_eval records that become scalars.
DOMAIN_KEYS = ("weight", "student_ppl", "teacher_ppl", "ratio", "rows", "epochs")
FINAL_KEYS = ("student_ppl", "teacher_ppl", "ratio", "student_before_ppl")
_NOT_SCALARS = ("step", "event")


def _number(value) -> float | int | None:
    """A value a tracker can plot: ints and floats (NaN/inf too), not bools or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def tracker_values(record: dict) -> dict[str, float]:
    """The scalars of one metrics.jsonl record, under the names in this module's docstring."""
    event = record.get("event")
    values: dict[str, Any] = {}
    if event == DOMAIN_UPDATE:
        for d, entry in record.get("domains", {}).items():
            for key in DOMAIN_KEYS:
                values[f"{key}/{d}"] = _number(entry.get(key))
    elif event == FINAL_EVAL:
        split = record.get("split", "val")
        for d, entry in record.get("domains", {}).items():
            for key in FINAL_KEYS:
                values[f"{split}/{key}/{d}"] = _number(entry.get(key))
    elif event == BENCHMARK_EVAL:
        for task, entry in record.get("tasks", {}).items():
            values[f"benchmark/{task}"] = _number(entry.get("score"))
            values[f"benchmark/{task}/stderr"] = _number(entry.get("stderr"))
        for d, entry in record.get("domains", {}).items():
            values[f"benchmark/domain/{d}"] = _number(entry.get("score"))
        values["benchmark/average"] = _number(record.get("average"))
    elif event == SKIPPED_STEP:
        values["train/skipped_step"] = 1
    elif event is None:
        for key, value in record.items():
            if key not in _NOT_SCALARS:
                values[f"train/{key}"] = _number(value)
    return {k: v for k, v in values.items() if v is not None}


def hyperparameters(config: dict) -> dict[str, Any]:
    """The resolved config as flat `section.key` scalars: every tracker's hyperparameter API
    takes bool/int/float/str; lists, mappings and None are written as JSON text."""
    flat = {}
    for section, values in config.items():
        for key, value in (values if isinstance(values, dict) else {"": values}).items():
            name = f"{section}.{key}" if key else section
            scalar = isinstance(value, bool | int | float | str)
            flat[name] = value if scalar else json.dumps(value)
    return flat


def _run_defaults(name: str, run_dir: Path, run_name: str) -> dict[str, Any]:
    """Where each tracker writes and what it calls the run, unless tracker_kwargs say otherwise."""
    return {
        "wandb": {"name": run_name, "dir": str(run_dir)},
        "trackio": {"name": run_name},
        "clearml": {"task_name": run_name},
        "dvclive": {"dir": str(run_dir / "dvclive")},
    }.get(name, {})


def _build(name: str, run_dir: Path, project: str, run_name: str, kwargs: dict, purge_step):
    """The tracker object Accelerator.init_trackers would build, with ddk's folders."""
    cls = LOGGER_TYPE_TO_CLASS[name]
    kwargs = {**_run_defaults(name, run_dir, run_name), **kwargs}
    if name == "tensorboard":
        # RUN/tensorboard; purge_step drops points a crashed run logged past its checkpoint.
        if purge_step is not None:
            kwargs.setdefault("purge_step", purge_step)
        return cls("tensorboard", run_dir, **kwargs)
    if name == "mlflow":
        return cls(**{"experiment_name": project, "run_name": run_name, **kwargs})
    if cls.requires_logging_directory:
        return cls(project, run_dir, **kwargs)
    return cls(project, **kwargs)


def _installed(name: str) -> bool:
    return name in {str(t) for t in get_available_trackers()}


class Trackers:
    """The trackers of one run (rank 0): a failing one is warned about once and dropped."""

    def __init__(
        self,
        names: list[str],
        run_dir: Path,
        *,
        project: str = "ddk",
        run_name: str | None = None,
        tracker_kwargs: dict[str, dict] | None = None,
        config: dict | None = None,
        purge_step: int | None = None,
    ):
        self.active: dict[str, Any] = {}
        run_name = run_name or Path(run_dir).resolve().name
        for name in dict.fromkeys(names):
            if not _installed(name):
                _warn(
                    f"report_to has {name} but it is not installed (pip install {name}); the run "
                    "continues without it"
                )
                continue
            kwargs = (tracker_kwargs or {}).get(name, {})
            try:
                tracker = _build(name, Path(run_dir), project, run_name, kwargs, purge_step)
                tracker.start()
                if config is not None:
                    tracker.store_init_configuration(hyperparameters(config))
            except Exception as e:  # a tracker's own error (login, server, files): not ddk's
                _warn(
                    f"tracker {name} could not start ({type(e).__name__}: {first_line(e)}); the "
                    "run continues without it"
                )
                continue
            self.active[name] = tracker

    def log_record(self, record: dict) -> None:
        values = tracker_values(record)
        if not values or "step" not in record:
            return
        self.log(values, int(record["step"]))

    def log(self, values: dict[str, float], step: int) -> None:
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(values, step=step)
            except Exception as e:
                del self.active[name]
                _warn(
                    f"tracker {name} failed ({type(e).__name__}: {first_line(e)}); the run "
                    "continues without it"
                )

    def close(self) -> None:
        for name, tracker in self.active.items():
            try:
                tracker.finish()
            except Exception as e:
                _warn(f"tracker {name} did not close cleanly ({type(e).__name__}: {first_line(e)})")
        self.active = {}


def start_trackers(cfg, run_dir: Path, step: int = 0) -> Trackers | None:
    """The trackers `cfg.trainer.report_to` names, with the resolved config as hyperparameters;
    None when it names none. `step`: a resumed run's step (TensorBoard purges points past it)."""
    t = cfg.trainer
    if not t.report_to:
        return None
    return Trackers(
        t.report_to,
        run_dir,
        project=t.tracker_project,
        run_name=t.tracker_run_name,
        tracker_kwargs=t.tracker_kwargs,
        config=cfg.model_dump(mode="json"),
        purge_step=step or None,
    )


def _warn(message: str) -> None:
    print(f"warning: {message}", flush=True)
