"""The trust boundary of `ddk distill --resume`: what a run folder may and may not change.

A run folder's `config.yaml` is a plain file anyone can edit; the checkpoint records the resolved
config and the data fingerprint it was trained with. On resume every key that changes the run's
meaning must still match that record. Deliberate changes go through `--set`, and only for the
keys in SETTABLE_ON_RESUME. `model.trust_remote_code` is never taken from the run folder: it
must be given again as `--set model.trust_remote_code=true` on each resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddk.config import Config, parse_override
from ddk.errors import DDKError

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
    # How the global batch is split (over more or fewer processes): the trainer checks that
    # micro_batch_size x grad_accum_steps x processes stays the same.
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


def recorded_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        raise DDKError(f"cannot read '{checkpoint / 'trainer_state.json'}'") from None


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
    saved = recorded_state(checkpoint)
    recorded = saved.get("config")
    warnings = []
    if isinstance(recorded, dict):
        current = cfg.model_dump(mode="json")
        diffs = protected_differences(recorded, current)
        if diffs:
            raise DDKError(
                f"cannot resume '{run_dir}': config.yaml (with --set) differs from what "
                f"{checkpoint.name} was trained with in {', '.join(diffs)}; restore those keys or start a new run"
            )
        old_lr = flatten(recorded).get("trainer.lr")
        if old_lr != cfg.trainer.lr:
            warnings.append(
                f"warning: trainer.lr changed from {old_lr} to {cfg.trainer.lr} on resume; the "
                "schedule continues from the checkpoint's step with the new peak"
            )
    fingerprint = saved.get("data_fingerprint")
    if fingerprint is not None and cfg.data.prepared:
        now = data_fingerprint(cfg.data.prepared)  # None: missing, which preflight reports
        if now is not None and now != fingerprint:
            raise DDKError(
                f"the prepared data '{cfg.data.prepared}' changed since {checkpoint.name} was "
                "written (it was prepared again or its domains differ); resume needs the same "
                "data: restore it or start a new run"
            )
    return warnings


def data_fingerprint(prepared: str | Path) -> str | None:
    """Identifies the prepared data as it is on disk: the SHA-256 of its manifest (which changes
    whenever `ddk prepare` writes the folder again) plus the size and modification time of
    every shard file, so a shard edited in place is noticed too. None when there is no
    manifest to read."""
    import hashlib

    from ddk.data.prepare import MANIFEST
    from ddk.fileutil import sha256_file

    folder = Path(prepared).expanduser()
    try:
        h = hashlib.sha256(sha256_file(folder / MANIFEST).encode())
    except OSError:
        return None
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        if path.name.startswith("."):  # lock files and the like
            continue
        st = path.stat()
        h.update(f"{path.relative_to(folder).as_posix()}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()
