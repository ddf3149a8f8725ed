"""A run folder's lifecycle: a new run, a resume, the lock that keeps one process per folder,
and the trust boundary of `ddk distill --resume`.

A run folder's `config.yaml` is a plain file anyone can edit; every checkpoint records the
resolved config and the data fingerprint it was trained with. On resume every key that changes
the run's meaning must still match that record. Deliberate changes go through `--set`, and only
for the keys in SETTABLE_ON_RESUME. `model.trust_remote_code` is never taken from the run
folder: it must be given again as `--set model.trust_remote_code=true` on each resume.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ddk import ranks
from ddk.checkpoint import latest_good_checkpoint, list_checkpoints, read_state
from ddk.config import Config, load_config, parse_override
from ddk.errors import DDKError
from ddk.identity import data_fingerprint
from ddk.lock import LOCK_NAME, FolderLock, raise_if_held
from ddk.metrics import truncate_metrics
from ddk.ownership import refuse_links
from ddk.ranks import print0
from ddk.runtime import Runtime
from ddk.teacher.source import pinned_cache
from ddk.trainer import Trainer

LOCK_HINT = "run"
# What ddk writes in a run folder besides config.yaml; the lock file comes first, before any
# check or model load, so even a run that died at once has it.
RUN_MARKERS = ("checkpoints", "metrics.jsonl", "teacher_ppl.json", LOCK_NAME)
RUN_FILES = ("config.yaml", "final", "report")

# Keys a resume may change with --set: they change how long, how often or how loudly the run
# goes, not what it learns from (trainer.lr does, and gets a warning).
SETTABLE_ON_RESUME = (
    "trainer.max_steps",
    "trainer.save_every",
    "trainer.log_every",
    "trainer.keep_checkpoints",
    "trainer.report_to",
    "trainer.tracker_project",
    "trainer.tracker_run_name",
    "trainer.tracker_kwargs",
    "trainer.eval_batch_size",
    "trainer.max_bad_steps",
    "trainer.gradient_checkpointing",
    "trainer.lr",
    # How the global batch is split (over more or fewer processes): the interval plan checks
    # that micro_batch_size x grad_accum_steps x processes stays the same.
    "trainer.micro_batch_size",
    "trainer.grad_accum_steps",
    "teacher.placement",  # where the frozen teacher lives, not what it computes
    # Benchmarks are reported, never steered by.
    "eval.tasks",
    "eval.num_fewshot",
    "eval.limit",
    "eval.batch_size",
    "eval.include_path",
    "eval.every_intervals",
    "eval.confirm_run_unsafe_code",
)
# Never compared: where the run lives (folders move) and the `ddk prepare` section.
_IGNORED = ("trainer.output_dir", "prepare.")
TRUST_KEY = "model.trust_remote_code"


# ---------------------------------------------------------------------------------- lifecycle
def has_run_marker(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_MARKERS)


def run_lock(run_dir: Path):
    """One process per run folder, held from before preflight to the run's end. Only global
    rank 0 takes it: ranks on one node would otherwise lock each other out."""
    if not ranks.is_main():
        return contextlib.nullcontext()
    return FolderLock(run_dir, LOCK_HINT)


def _refuse_non_empty(run_dir: Path, created: bool) -> None:
    if created or not any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        return
    raise_if_held(run_dir, LOCK_HINT)  # a live run there: name its PID
    if not has_run_marker(run_dir):  # the user's own folder: --resume would not help
        first = sorted(p.name for p in run_dir.iterdir())[0]
        raise DDKError(
            f"run folder '{run_dir}' is not empty and holds no ddk run ({first}, ...); "
            "set trainer.output_dir to a new or empty folder"
        )
    raise DDKError(
        f"run folder '{run_dir}' is not empty; resume it with `ddk distill --resume "
        f"{run_dir}` or set trainer.output_dir to a new folder"
    )


def start_run(cfg: Config, runtime=None) -> Path | None:
    """A new run in cfg.trainer.output_dir; refuses a folder that already holds a run."""
    run_dir = Path(cfg.trainer.output_dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise DDKError(f"trainer.output_dir '{run_dir}' is a file; choose a folder")
    created = not run_dir.exists()
    _refuse_non_empty(run_dir, created)  # before locking: a refused folder is left as it was
    with run_lock(run_dir):
        _refuse_non_empty(run_dir, created)  # a run may have started in between
        try:
            trainer = Trainer(cfg, run_dir, runtime=runtime)
        except BaseException:
            # Refused before anything was written: leave no folder holding only the lock
            # (rank 0 holds it and cleans up; the other ranks must not race it).
            if created and ranks.is_main() and [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
                (run_dir / LOCK_NAME).unlink()
                run_dir.rmdir()
            raise
        if trainer.is_main:
            cfg.save(run_dir / "config.yaml")
        return trainer.train()


def resume_run(
    run_dir: str | Path, overrides: list[str] | None = None, runtime=None
) -> Path | None:
    """Continue from the newest intact checkpoint; a run that died before its first checkpoint
    starts again from step 0 with its saved config. The run folder's config.yaml must agree
    with what the checkpoint recorded (`check_resume`)."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise DDKError(f"'{run_dir}' holds no run (no config.yaml) to resume")
    if not has_run_marker(run_dir):
        # A folder with only someone's config.yaml: resuming would train into it and rewrite
        # that file. Checked before the lock, so a refused folder gains no lock file.
        raise DDKError(
            f"'{run_dir}' holds a config.yaml but no run that ddk started (no checkpoints/, "
            f"metrics.jsonl or {LOCK_NAME}); start a new run in a new folder instead"
        )
    # Resuming rewrites config.yaml and metrics.jsonl and replaces checkpoints and final/.
    refuse_links(run_dir, f"run folder '{run_dir}'", [*RUN_FILES, *RUN_MARKERS], folder_too=False)
    with run_lock(run_dir):
        override_keys = check_overrides(overrides or [])
        cfg = load_config(run_dir / "config.yaml", overrides)
        rt = runtime if runtime is not None else Runtime()
        # Checked once, on rank 0, and its verdict given to every rank (the checksums are not
        # re-hashed by each process).
        checkpoint = rt.main_result(lambda: latest_good_checkpoint(run_dir))
        if checkpoint is None and list_checkpoints(run_dir):
            raise DDKError(f"'{run_dir}' has no intact checkpoint to resume from; start a new run")
        for warning in check_resume(run_dir, cfg, override_keys, checkpoint):
            print0(warning)
        print0(
            f"resuming from {checkpoint}"
            if checkpoint
            else f"no checkpoint yet: restarting {run_dir}"
        )
        trainer = Trainer(cfg, run_dir, resume_from=checkpoint, runtime=rt)
        if trainer.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", trainer.state.step)
            cfg.save(run_dir / "config.yaml")
        return trainer.train()


# ---------------------------------------------------------------------------------- resume checks
def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """{'trainer': {'lr': 1}} -> {'trainer.lr': 1} (one level of sections)."""
    flat = {}
    for section, values in config.items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value
        else:
            flat[section] = values
    return flat


def protected_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose value differs between two resolved configs and that a resume may not change."""
    a, b = flatten(recorded), flatten(current)
    # Keys only one side knows come from another ddk version's schema; their defaults apply.
    keys = sorted(set(a) & set(b))
    return [
        k
        for k in keys
        if a.get(k) != b.get(k) and k not in SETTABLE_ON_RESUME and not k.startswith(_IGNORED)
    ]


def check_overrides(overrides: list[str]) -> list[str]:
    """The override keys, refused unless each one is allowed on resume."""
    keys = []
    for item in overrides:
        path, _ = parse_override(item)
        key = ".".join(path)
        if key not in SETTABLE_ON_RESUME and key != TRUST_KEY:
            raise DDKError(
                f"--set {key} is not allowed on --resume (it would change what the run means); "
                f"allowed: {', '.join(SETTABLE_ON_RESUME)}; start a new run to change it"
            )
        keys.append(key)
    return keys


def check_resume(
    run_dir: Path, cfg: Config, override_keys: list[str], checkpoint: Path | None
) -> list[str]:
    """Refuse a resume that the run folder's edits would change; return warnings to print.

    `cfg` is config.yaml with the --set overrides applied. Runs before anything is written.
    """
    if cfg.model.trust_remote_code and TRUST_KEY not in override_keys:
        raise DDKError(
            f"'{run_dir / 'config.yaml'}' sets model.trust_remote_code; ddk never runs a model's "
            "code because a run folder says so: resume with --set model.trust_remote_code=true if "
            "you trust the models"
        )
    if checkpoint is None:
        return []
    saved = read_state(checkpoint)
    warnings = _config_warnings(run_dir, cfg, checkpoint, saved.get("config"))
    fingerprint = saved.get("data_fingerprint")
    if fingerprint is not None and cfg.data.prepared:
        now = data_fingerprint(cfg.data.prepared)  # None: missing, which preflight reports
        if now is not None and now != fingerprint:
            raise DDKError(
                f"the prepared data '{cfg.data.prepared}' changed since {checkpoint.name} was "
                "written (it was prepared again or its domains differ); resume needs the same "
                "data: restore it or start a new run"
            )
    pinned = saved.get("teacher_cache")
    if pinned is not None and pinned != pinned_cache(cfg):
        raise DDKError(
            f"the teacher cache '{cfg.teacher.cache}' changed since {checkpoint.name} was "
            "written (it was rebuilt, with other settings or bytes); resume needs the cache it "
            "trained on: restore it or start a new run"
        )
    return warnings


def _config_warnings(run_dir: Path, cfg: Config, checkpoint: Path, recorded) -> list[str]:
    if not isinstance(recorded, dict):
        return []
    diffs = protected_differences(recorded, cfg.model_dump(mode="json"))
    if diffs:
        raise DDKError(
            f"cannot resume '{run_dir}': config.yaml (with --set) differs from what "
            f"{checkpoint.name} was trained with in {', '.join(diffs)}; restore those keys or "
            "start a new run"
        )
    old_lr = flatten(recorded).get("trainer.lr")
    if old_lr == cfg.trainer.lr:
        return []
    return [
        f"warning: trainer.lr changed from {old_lr} to {cfg.trainer.lr} on resume; the "
        "schedule continues from the checkpoint's step with the new peak"
    ]
