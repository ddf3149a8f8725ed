"""Scoring a model in memory through lm-eval: its `HFLM` wraps the model object (no second
load), its task configs build the requests and its metrics score them. ddk picks each task's
primary metric (the first of its config's `metric_list` that lm-eval reports) for tables,
domain means and the average. lm-eval's global seeds are set for the evaluation and the previous
random states restored after it, so a model scores as under `lm_eval --model hf` and a run's
training randomness is untouched."""

from __future__ import annotations

import contextlib
import math
import random
import time

import numpy as np
import torch

from ddk.errors import DDKError, first_line
from ddk.harness.tasks import (
    SEEDS,
    BenchmarkPlan,
    lm_eval_version,
    load_tasks,
    manager_for,
    quiet_lm_eval,
    require_lm_eval,
)


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


def score(model, tokenizer, plan: BenchmarkPlan) -> dict:
    """Score `model` (a transformers causal LM, whole on one device) on the plan's tasks.
    Returns the benchmark record (see `benchmark_record`); raises on any failure."""
    require_lm_eval()
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    started = time.perf_counter()
    names = list(plan.tasks)
    with quiet_lm_eval(), _lm_eval_seeds():
        loaded, parent = _load_each(manager_for(names, plan.include_path), names, plan)
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
        loaded = load_tasks(manager, [name], plan.include_path)
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


def score_or_failure(model, tokenizer, plan: BenchmarkPlan, device=None) -> dict:
    """`score` (on `device`, when given: a whole copy gathered from shards is built on the
    CPU, where a real model would take hours), but a failure (during training; no room on the
    device too) is a warning and a record, never a stop: {"failed": "<type>: <first line>"}."""
    try:
        return score(model if device is None else model.to(device), tokenizer, plan)
    except Exception as e:
        reason = f"{type(e).__name__}: {first_line(e)}"
        print(f"warning: benchmark evaluation failed ({reason}); training continues", flush=True)
        return {"failed": reason, "lm_eval_version": _version_or_none()}


def _version_or_none() -> str | None:
    try:
        return lm_eval_version()
    except DDKError:
        return None
