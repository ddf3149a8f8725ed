"""Which lm-eval tasks a run scores, and every problem with them found before training.

`BenchmarkPlan` is the `eval` config section resolved (task -> domain, n-shot, limit, ...);
`plan_problems` loads each task through lm-eval's `TaskManager` (which fetches its data set)
and names, one phrase each: lm-eval not installed, a missing include_path, an unknown task
(with close matches), a data set that cannot be had offline, a code-executing task not
confirmed, a task mapped to a domain the data does not have.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ddk.errors import DDKError, first_line

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
        require_lm_eval()
    except DDKError as e:
        return [*problems, f"eval.tasks: {e}"]
    missing = [p for p in plan.include_path if not Path(p).is_dir()]
    for p in missing:
        problems.append(f"eval.include_path: '{p}' is not a folder")
    if missing:
        return problems
    manager = manager_for(list(plan.tasks), plan.include_path)
    for name in plan.tasks:
        if name not in manager.all_tasks:
            problems.append(_unknown_task(name, plan.include_path))
            continue
        try:
            with quiet_lm_eval():
                loaded = load_tasks(manager, [name], plan.include_path)
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


def require_lm_eval():
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
        return getattr(require_lm_eval(), "__version__", "unknown")


@lru_cache(maxsize=8)
def task_manager(include_path: tuple[str, ...], defaults: bool):
    """lm-eval's task index; building the full one reads ~15k task names (seconds): once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=defaults)


def manager_for(names: list[str], include_path: tuple[str, ...]):
    """Only the user's own folders when they define every name (fast); else lm-eval's too."""
    if include_path:
        local = task_manager(include_path, False)
        if all(n in local.all_tasks for n in names):
            return local
    return task_manager(include_path, True)


def load_tasks(manager, names: list[str], include_path: tuple[str, ...]) -> dict:
    try:
        return manager.load(names)
    except KeyError:
        # A group in the user's folders may name lm-eval's own tasks: load with both.
        full = task_manager(include_path, True)
        if full is manager:
            raise
        return full.load(names)


def _unknown_task(name: str, include_path: tuple[str, ...]) -> str:
    known = task_manager(include_path, True).all_tasks
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
            with quiet_lm_eval():
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


@contextlib.contextmanager
def quiet_lm_eval():
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
