"""The on-disk format of a checkpoint: written to a temporary folder, fsynced, renamed into place,
with a manifest of SHA-256 checksums; the newest intact checkpoint is the one resumed from.

    RUN/checkpoints/step-00000040/
        trainer_state.json   {"trainer": the run's progress and its interval plan, "scheduler",
                              "config": the resolved config, "data_fingerprint"}: JSON
        plan.npy             the interval plan's rows (every numpy array of a state: <key>.npy)
        rng.pt               Python, numpy, torch (and CUDA) RNG states
        model.safetensors    the student's trainable weights (whole-state backends: DDP, one
                             process; a LoRA run: its adapters, `ddk.lora.trainable_weights`)
        optimizer.pt         the optimizer state (whole-state backends)
        sharded/ | deepspeed/  the model and optimizer shards (FSDP2 / DeepSpeed ZeRO), written
                             by every rank through `ddk.runtime`
        checksums.json       SHA-256 of every file above

Nothing here unpickles arbitrary objects: tensors live in safetensors files, the optimizer and
RNG states are read with `torch.load(weights_only=True)`, everything else is JSON. What goes
into these files is decided by `ddk.checkpointer`; how sharded states are written, by
`ddk.runtime`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from ddk.errors import DDKError, first_line
from ddk.fileutil import disk_full, fsync_dir, human_bytes, publish_dir, sha256_file

CHECKSUMS = "checksums.json"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Folders of sharded model and optimizer states inside a checkpoint.
SHARDED = "sharded"  # FSDP2: a torch.distributed.checkpoint folder
DEEPSPEED = "deepspeed"  # DeepSpeed ZeRO: the engine's checkpoint folder
DEEPSPEED_TAG = "state"

# Format 1 keeps the interval plan's JSON fields inside the "trainer" record (state name ->
# record name; any other state is stored under its own name).
RECORD_OF = {"plan": "trainer"}


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder), newest first; half-written temporary folders are not listed."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """A fresh temporary folder for checkpoint `step` (stale ones from killed saves removed)."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:  # a killed save's
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def commit_checkpoint(
    run_dir: Path,
    step: int,
    tmp: Path,
    *,
    state: dict,
    arrays: dict[str, np.ndarray],
    rng_state: dict,
    keep: int,
    model: torch.nn.Module | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write the rest of checkpoint `step` into `tmp` (which may already hold sharded states),
    checksum every file, rename into place, then drop all but the newest `keep`."""
    root = checkpoints_dir(run_dir)
    try:
        _write_files(tmp, model, optimizer_state, state, arrays, rng_state)
    except (OSError, SafetensorError, RuntimeError) as e:
        # The previous checkpoints are untouched; only the half-written folder goes.
        shutil.rmtree(tmp, ignore_errors=True)
        problem = _write_error(e, root, step, checkpoint_bytes(model, optimizer_state, arrays))
        if problem is None:
            raise
        raise problem from None
    final = root / f"step-{step:08d}"
    # The same step saved again (e.g. a resumed run's final save) replaces the old one.
    publish_dir(tmp, final, aside=root / f".old-step-{step:08d}-{os.getpid()}")
    for _, old in list_checkpoints(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_error(e: BaseException, root: Path, step: int, need: int) -> DDKError | None:
    """The one-line error for a failed checkpoint write; None: not the user's to fix."""
    free = shutil.disk_usage(root).free
    # torch.save reports a full disk only as "iostream error": judge by the space left.
    if disk_full(e) or free < need:
        return DDKError(
            f"disk full while writing checkpoint step {step} to '{root}': it needs about "
            f"{human_bytes(need, 'MiB')} (model + optimizer state), {human_bytes(free, 'MiB')} "
            "is free; free space and resume with `ddk distill --resume`"
        )
    if not isinstance(e, OSError):
        return None
    return DDKError(
        f"cannot write checkpoint step {step} to '{root}': {e.strerror or first_line(e)}"
    )


def _write_files(tmp: Path, model, optimizer_state, state, arrays, rng_state) -> None:
    """The unsharded files, then checksums of everything in `tmp` (shards included), fsynced."""
    if model is not None:
        save_model(model, str(tmp / MODEL_FILE))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    torch.save(rng_state, tmp / RNG_FILE)
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    sums = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in _files(tmp)}
    (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2))
    for p in _files(tmp):
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        fsync_dir(d)


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer_state: dict,
    state: dict,
    arrays: dict[str, np.ndarray],
    rng_state: dict,
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep`."""
    tmp = begin_checkpoint(run_dir, step)
    return commit_checkpoint(
        run_dir,
        step,
        tmp,
        state=state,
        arrays=arrays,
        rng_state=rng_state,
        keep=keep,
        model=model,
        optimizer_state=optimizer_state,
    )


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def checkpoint_bytes(model: torch.nn.Module | None, optimizer_state: dict | None, arrays) -> int:
    """About what one checkpoint takes on disk: weights + optimizer moments + the plan (the
    unsharded part only, when model/optimizer states are sharded)."""
    return (
        (_tensor_bytes(model.state_dict()) if model is not None else 0)
        + _tensor_bytes(optimizer_state or {})
        + sum(a.nbytes for a in arrays.values() if a is not None)
    )


def verify_checkpoint(folder: Path) -> str | None:
    """None when intact, else what is wrong with it."""
    sums_path = folder / CHECKSUMS
    if not sums_path.is_file():
        return "no checksums.json (incomplete)"
    try:
        sums = json.loads(sums_path.read_text())
    except json.JSONDecodeError:
        return "checksums.json is corrupt"
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its checksum"
    return None


def latest_good_checkpoint(run_dir: Path, log=print) -> Path | None:
    """The newest intact checkpoint; a broken newer one is reported and skipped."""
    for _, folder in list_checkpoints(run_dir):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        log(f"warning: checkpoint '{folder}' is unusable ({problem}); trying the previous one")
    return None


def read_state(folder: Path) -> dict:
    """The JSON record of a checkpoint (what `--resume` checks before anything loads)."""
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        raise DDKError(f"cannot read '{folder / STATE_FILE}'") from None


def saved_geometry(state: dict) -> dict:
    """What the saved plan and positions assume (global batch, processes, K, ...)."""
    return state.get("trainer", {}).get("geometry", {})


def load_checkpoint(folder: Path, model: torch.nn.Module | None, device) -> dict:
    """Load the weights into `model` and return the rest (state, optimizer, rng, arrays);
    with `model=None` (sharded checkpoints) weights and optimizer are left to the caller."""
    try:
        optimizer_state = None
        if model is not None:
            load_model(model, str(folder / MODEL_FILE), device=str(device))
            optimizer_state = torch.load(
                folder / OPTIMIZER_FILE, map_location=device, weights_only=True
            )
        rng_state = torch.load(folder / RNG_FILE, weights_only=True)
        state = json.loads((folder / STATE_FILE).read_text())
        arrays = {p.stem: np.load(p, allow_pickle=False) for p in folder.glob("*.npy")}
    except Exception as e:  # a checkpoint that passed its checksums but does not fit the model
        raise DDKError(f"cannot load checkpoint '{folder}': {first_line(e)}") from None
    return {"state": state, "optimizer": optimizer_state, "rng": rng_state, "arrays": arrays}


def sharded_states_dir(folder: Path) -> Path | None:
    """The folder of sharded states a checkpoint holds, or None for whole states."""
    for name in (SHARDED, DEEPSPEED):
        if (folder / name).is_dir():
            return folder / name
    return None
