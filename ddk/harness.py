"""Benchmark scores through lm-evaluation-harness (`lm-eval`), on a model already in memory.

    plan = BenchmarkPlan.from_section(cfg.eval)   # task -> domain, n-shot, limit, batch size
    problems = plan_problems(plan, domains)       # before any training step; one phrase each
    record = score(model, tokenizer, plan)        # per task: score, stderr, n-shot, version

Scoring is lm-eval's own: its `HFLM` wraps the model object (no second load), its task
configs build the requests and its metrics score them; ddk only picks each task's primary
metric (the first the task reports, e.g. gsm8k's `exact_match,strict-match`, a multiple-choice
task's `acc`) for tables, domain means and the average. lm-eval's global seeds are set for the
evaluation and the previous random states restored after it, so the same model scores the same
as under `lm_eval --model hf` and a run's training randomness is untouched.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from ddk.errors import DDKError, first_line
from ddk.evaluate import eval_model, eval_tokenizer
from ddk.fileutil import write_json_atomic
from ddk.metrics import BENCHMARK_EVAL, BENCHMARKS_FORMAT
from ddk.table import format_table

LM_EVAL_EXTRA = "pip install 'ddk-distill[eval]'"
# lm-eval's default seeds (lm_eval.evaluator.simple_evaluate): python, numpy, torch, few-shot.
SEEDS = (0, 1234, 1234, 1234)
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class BenchmarkPlan:
    """What to score: lm-eval task/group/tag names with their domain (None for a plain list)."""

    tasks: dict[str, str | None]
    num_fewshot: int | dict[str, int] | None = None
    limit: int | float | None = None
    batch_size: int | str = 8
    include_path: tuple[str, ...] = ()
    confirm_run_unsafe_code: bool = False

    @classmethod
    def from_section(cls, section) -> BenchmarkPlan:
        """From the config's `eval` section (ddk.config.EvalSection)."""
        if isinstance(section.tasks, dict):
            tasks = {t: d for d, names in section.tasks.items() for t in names}
        else:
            tasks = dict.fromkeys(section.tasks)
        return cls(
            tasks=tasks,
            num_fewshot=section.num_fewshot,
            limit=section.limit,
            batch_size=section.batch_size,
            include_path=tuple(str(Path(p).expanduser()) for p in section.include_path),
            confirm_run_unsafe_code=section.confirm_run_unsafe_code,
        )

    def fewshot_for(self, name: str) -> int | None:
        if isinstance(self.num_fewshot, dict):
            return self.num_fewshot.get(name)
        return self.num_fewshot


# ------------------------------------------------------------------ checks before training


def plan_problems(plan: BenchmarkPlan, domains: list[str] | None = None) -> list[str]:
    """Every problem with the benchmarks, each a phrase naming its `eval.*` key: lm-eval not
    installed, a missing include_path, an unknown task (with close matches), a task whose data
    set cannot be had offline, a code-executing task not confirmed, a task mapped to a domain
    the data does not have. Loading a task fetches its data set, so a later score needs no
    network that this check did not."""
    problems = []
    if domains is not None:
        for d in dict.fromkeys(d for d in plan.tasks.values() if d is not None):
            if d not in domains:
                problems.append(
                    f"eval.tasks: domain '{d}' is not a domain of the data ({', '.join(domains)})"
                )
    if isinstance(plan.num_fewshot, dict):
        for name in plan.num_fewshot:
            if name not in plan.tasks:
                problems.append(f"eval.num_fewshot: '{name}' is not one of eval.tasks")
    if not plan.tasks:
        return problems
    try:
        _lm_eval()
    except DDKError as e:
        return [*problems, f"eval.tasks: {e}"]
    missing = [p for p in plan.include_path if not Path(p).is_dir()]
    for p in missing:
        problems.append(f"eval.include_path: '{p}' is not a folder")
    if missing:
        return problems
    manager = _manager_for(list(plan.tasks), plan.include_path)
    for name in plan.tasks:
        if name not in manager.all_tasks:
            problems.append(_unknown_task(name, plan.include_path))
            continue
        try:
            with _quiet_lm_eval():
                loaded = _load(manager, [name], plan.include_path)
        except Exception as e:
            problems.append(_load_problem(manager, name, e))
            continue
        for task_name, task in loaded["tasks"].items():
            if getattr(task, "UNSAFE_CODE", False) and not plan.confirm_run_unsafe_code:
                problems.append(
                    f"eval.tasks: task '{task_name}' executes the code the model writes; set "
                    "eval.confirm_run_unsafe_code: true (and HF_ALLOW_CODE_EVAL=1) to allow it"
                )
                break
    return problems


def check_plan(plan: BenchmarkPlan, domains: list[str] | None = None) -> None:
    """Raise one DDKError listing every problem (for commands outside `ddk distill`)."""
    problems = plan_problems(plan, domains)
    if problems:
        raise DDKError("; ".join(problems))


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401
    except ImportError:
        raise DDKError(
            f"benchmarks need lm-eval, which is not installed: {LM_EVAL_EXTRA}"
        ) from None
    return lm_eval


def lm_eval_version() -> str:
    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return getattr(_lm_eval(), "__version__", "unknown")


@lru_cache(maxsize=8)
def _manager(include_path: tuple[str, ...], defaults: bool):
    """lm-eval's task index; building the full one reads ~15k task names (seconds): once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=defaults)


def _manager_for(names: list[str], include_path: tuple[str, ...]):
    """Only the user's own folders when they define every name (fast); else lm-eval's too."""
    if include_path:
        local = _manager(include_path, False)
        if all(n in local.all_tasks for n in names):
            return local
    return _manager(include_path, True)


def _load(manager, names: list[str], include_path: tuple[str, ...]) -> dict:
    try:
        return manager.load(names)
    except KeyError:
        # A group in the user's folders may name lm-eval's own tasks: load with both.
        full = _manager(include_path, True)
        if full is manager:
            raise
        return full.load(names)


def _unknown_task(name: str, include_path: tuple[str, ...]) -> str:
    known = _manager(include_path, True).all_tasks
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "`lm-eval ls tasks` lists them"
    where = "lm-eval's tasks" + (" or eval.include_path" if include_path else "")
    return f"eval.tasks: unknown task '{name}' (not in {where}); {hint}"


def _leaf_entries(manager, name: str, seen: frozenset = frozenset()) -> list:
    """The index entries of the single tasks a task, group or tag name stands for."""
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(name)
    if entry is None or name in seen:
        return []
    seen = seen | {name}
    if entry.kind == Kind.TAG:
        return [e for e in manager.task_index.values() if name in (e.tags or ())]
    if entry.kind == Kind.GROUP:
        leaves = []
        for child in (entry.cfg or {}).get("task", []):
            child_name = child.get("task") if isinstance(child, dict) else child
            if isinstance(child_name, str):
                leaves += _leaf_entries(manager, child_name, seen)
        return leaves
    return [entry]


def _offline_setting() -> str:
    on = [v for v in OFFLINE_VARIABLES if os.environ.get(v, "").strip().lower() in ("1", "true")]
    if on:
        return f"{'/'.join(on)}=1 is set"
    return "the Hugging Face hub cannot be reached from here"


def _is_offline_error(error: BaseException) -> bool:
    chain = []
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    return bool(
        names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError"}
        or "Couldn't reach" in text
        or "on the Hugging Face Hub" in text
        or "offline" in text.lower()
    )


def _load_problem(manager, name: str, error: BaseException) -> str:
    """One phrase for a task that would not load, naming the data set when that is the cause."""
    for entry in _leaf_entries(manager, name) or []:
        try:
            with _quiet_lm_eval():
                manager.load([entry.name])
        except Exception as leaf_error:
            name, error = entry.name, leaf_error
            cfg = entry.cfg or {}
            break
    else:
        cfg = {}
    dataset = cfg.get("dataset_path")
    if dataset and _is_offline_error(error):
        config = f" (config '{cfg['dataset_name']}')" if cfg.get("dataset_name") else ""
        import datasets

        return (
            f"eval.tasks: task '{name}' needs the data set '{dataset}'{config}, which is not in "
            f"the local cache ({datasets.config.HF_DATASETS_CACHE}) and cannot be downloaded "
            f"({_offline_setting()}); download it where the hub is reachable into the same "
            "HF_HOME, or use a task over local files (eval.include_path)"
        )
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files and isinstance(error, FileNotFoundError | OSError):
        return f"eval.tasks: task '{name}' reads data files {files} that cannot be read: {first_line(error)}"
    offline = f"; {_offline_setting()}" if _is_offline_error(error) else ""
    return (
        f"eval.tasks: task '{name}' could not be loaded ({type(error).__name__}: "
        f"{first_line(error)}{offline})"
    )


# ------------------------------------------------------------------ scoring


@contextlib.contextmanager
def _lm_eval_seeds():
    """lm-eval's seeds inside, the caller's random states restored after."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    random.seed(SEEDS[0])
    np.random.seed(SEEDS[1])
    torch.manual_seed(SEEDS[2])
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs every request batch and a warning per in-memory model; ddk prints a table."""
    from datasets.utils import logging as datasets_logging

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    bars_were_on = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars_were_on:
            datasets_logging.enable_progress_bar()


def score(model, tokenizer, plan: BenchmarkPlan) -> dict:
    """Score `model` (a transformers causal LM, whole on one device) on the plan's tasks.
    Returns the benchmark record (see `benchmark_record`); raises on any failure."""
    _lm_eval()
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    started = time.perf_counter()
    names = list(plan.tasks)
    with _quiet_lm_eval(), _lm_eval_seeds():
        loaded, parent = _load_each(_manager_for(names, plan.include_path), names, plan)
        for task_name, task in loaded["tasks"].items():
            _set_fewshot(task, plan.fewshot_for(parent[task_name]))
        was_training = model.training
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=plan.batch_size)
            with torch.no_grad():
                raw = evaluate(
                    lm=lm,
                    task_dict=loaded,
                    limit=plan.limit,
                    log_samples=False,
                    confirm_run_unsafe_code=plan.confirm_run_unsafe_code,
                )
        finally:
            model.train(was_training)
    order = _metric_order(loaded)
    return benchmark_record(raw, plan, parent, order, time.perf_counter() - started)


def _metric_order(loaded: dict) -> dict[str, list[str]]:
    """Each task's and group's metrics in its config's order: the first is its primary one."""
    order = {}
    for name, task in loaded["tasks"].items():
        metrics = getattr(task.config, "metric_list", None) or []
        order[name] = [m["metric"] for m in metrics if isinstance(m.get("metric"), str)]
    for name, group in loaded["groups"].items():
        metrics = getattr(group, "aggregate_metric_list", None) or []
        order[name] = [m.metric for m in metrics if isinstance(getattr(m, "metric", None), str)]
    return order


def _load_each(manager, names: list[str], plan: BenchmarkPlan) -> tuple[dict, dict[str, str]]:
    """All requested tasks in one lm-eval task dict, and each single task -> the requested
    name (task, group or tag) it came from."""
    merged: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    parent: dict[str, str] = {}
    for name in names:
        loaded = _load(manager, [name], plan.include_path)
        for key in merged:
            merged[key].update(loaded.get(key) or {})
        for task_name in loaded["tasks"]:
            parent.setdefault(task_name, name)
    return merged, parent


def _set_fewshot(task, wanted: int | None) -> None:
    """lm-eval's rule (simple_evaluate): a task whose config fixes 0 shots keeps 0; without a
    wish and without a default, 0."""
    current = task.get_config("num_fewshot")
    if wanted is not None and current != 0:
        task.set_config(key="num_fewshot", value=wanted)
    elif current is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=SEEDS[3])


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _row_entry(raw: dict, name: str, leaves: list[str], order: list[str]) -> dict:
    """One task's (or group's) line of lm-eval's results: every metric, and the primary one
    (the first of `order`, the config's metrics, that lm-eval reported; else its first)."""
    row = raw["results"][name]
    metrics = {}
    for key, value in row.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, _, filt = key.partition(",")
        metrics[key] = {
            "value": _number(value),
            "stderr": _number(row.get(f"{metric}_stderr,{filt}")),
        }
    if not metrics:
        raise DDKError(f"lm-eval reported no metric for task '{name}'")
    reported = [key.partition(",")[0] for key in metrics]
    first = next((m for m in order if m in reported), reported[0])
    primary = next(key for key in metrics if key.partition(",")[0] == first)
    shots = {raw.get("n-shot", {}).get(t) for t in leaves}
    samples = [raw.get("n-samples", {}).get(t, {}).get("effective") for t in leaves]
    better = raw.get("higher_is_better", {}).get(name, {}).get(primary.partition(",")[0])
    return {
        "metric": primary,
        "score": metrics[primary]["value"],
        "stderr": metrics[primary]["stderr"],
        "higher_is_better": better,
        "n_shot": shots.pop() if len(shots) == 1 else sorted(s for s in shots if s is not None),
        "samples": sum(s for s in samples if isinstance(s, int)) if samples else None,
        "version": raw.get("versions", {}).get(name),
        "subtasks": len(leaves) if len(leaves) > 1 or leaves != [name] else None,
        "metrics": metrics,
    }


def benchmark_record(
    raw: dict, plan: BenchmarkPlan, parent: dict, order: dict[str, list[str]], seconds: float
) -> dict:
    """ddk's record of one evaluation (RUN/benchmarks.json, the `benchmark_eval` event):

    {"lm_eval_version", "limit", "num_fewshot", "seconds",
     "tasks": {task: {"domain", "metric", "score", "stderr", "higher_is_better", "n_shot",
                      "samples", "limit", "version", "subtasks", "metrics": {key: {value, stderr}}}},
     "domains": {domain: {"score": mean of its tasks' scores, "tasks": [...]}},
     "average": mean score over the tasks}

    A group (mmlu) is one entry with lm-eval's aggregate; a tag (ai2_arc) one entry per task."""
    tasks = {}
    for name in plan.tasks:
        leaves = [t for t, p in parent.items() if p == name]
        if name in raw["results"]:
            entries = {name: _row_entry(raw, name, leaves, order.get(name, []))}
        else:
            entries = {t: _row_entry(raw, t, [t], order.get(t, [])) for t in leaves}
        for task_name, entry in entries.items():
            tasks[task_name] = {"domain": plan.tasks[name], **entry, "limit": plan.limit}
    domains: dict[str, dict] = {}
    for task_name, entry in tasks.items():
        if entry["domain"] is not None:
            domains.setdefault(entry["domain"], {"tasks": []})["tasks"].append(task_name)
    for entry in domains.values():
        entry["score"] = _mean(tasks[t]["score"] for t in entry["tasks"])
    return {
        "lm_eval_version": lm_eval_version(),
        "limit": plan.limit,
        "num_fewshot": plan.num_fewshot,
        "seconds": round(seconds, 3),
        "tasks": tasks,
        "domains": domains,
        "average": _mean(e["score"] for e in tasks.values()),
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def score_or_failure(model, tokenizer, plan: BenchmarkPlan) -> dict:
    """`score`, but a failure (during training) is a warning and a record, never a stop:
    {"failed": "<error type>: <first line>"}."""
    try:
        return score(model, tokenizer, plan)
    except Exception as e:
        reason = f"{type(e).__name__}: {first_line(e)}"
        print(f"warning: benchmark evaluation failed ({reason}); training continues", flush=True)
        return {"failed": reason, "lm_eval_version": _version_or_none()}


def _version_or_none() -> str | None:
    try:
        return lm_eval_version()
    except DDKError:
        return None


# ------------------------------------------------------------------ files and tables


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


# ------------------------------------------------------------------ inside a run


class RunBenchmarks:
    """Scores a run's student in process (rank 0): the final model, and every
    `eval.every_intervals` intervals. Each scoring is a `benchmark_eval` record for metrics.jsonl
    (`{"event", "step", "final", **score's record}`, or `"failed"` instead of the scores) and
    rewrites RUN/benchmarks.json: the latest scores and a `history` of every scoring so far.
    Reporting only: nothing here is read back by the sampler."""

    def __init__(self, section, run_dir: Path, tokenizer):
        self.plan = BenchmarkPlan.from_section(section)
        self.every = section.every_intervals
        self.run_dir = Path(run_dir)
        self.tokenizer = tokenizer

    @property
    def enabled(self) -> bool:
        return bool(self.plan.tasks)

    def due(self, interval: int) -> bool:
        """Whether the evaluation that opens `interval` also scores benchmarks."""
        return (
            self.enabled and self.every is not None and interval > 0 and interval % self.every == 0
        )

    def score(self, model, step: int, *, final: bool = False) -> dict:
        record = score_or_failure(model, self.tokenizer, self.plan)
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
