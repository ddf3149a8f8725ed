"""Crash-safe checkpoints: written to a temporary folder, fsynced, renamed into place, with a
manifest of SHA-256 checksums; the newest intact checkpoint is the one resumed from.

Nothing here unpickles arbitrary objects: tensors live in safetensors files, the optimizer
state is read with `torch.load(weights_only=True)`, everything else is JSON.
"""

from __future__ import annotations

import errno
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
from ddk.fileutil import sha256_file

CHECKSUMS = "checksums.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    final = root / f"step-{step:08d}"
    try:
        _write_files(tmp, model, optimizer_state, state, arrays, rng_state)
    except (OSError, SafetensorError, RuntimeError) as e:
        # The previous checkpoints are untouched; only the half-written folder goes.
        shutil.rmtree(tmp, ignore_errors=True)
        need = checkpoint_bytes(model, optimizer_state, arrays)
        free = shutil.disk_usage(root).free
        # torch.save reports a full disk only as "iostream error": judge by the space left.
        if _out_of_space(e) or free < need:
            raise DDKError(
                f"disk full while writing checkpoint step {step} to '{root}': it needs about "
                f"{_mb(need)} (model + optimizer state), {_mb(free)} is free; free space and "
                "resume with `ddk distill --resume`"
            ) from None
        if not isinstance(e, OSError):
            raise
        raise DDKError(
            f"cannot write checkpoint step {step} to '{root}': {e.strerror or first_line(e)}"
        ) from None
    old = None
    if final.exists():  # the same step saved again (e.g. a resumed run's final save)
        old = root / f".old-step-{step:08d}-{os.getpid()}"
        final.rename(old)  # set aside, removed only once the new one is in place
    tmp.rename(final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for _, old in list_checkpoints(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(tmp: Path, model, optimizer_state, state, arrays, rng_state) -> None:
    """The unsharded files, then checksums of everything in `tmp` (shards included), fsynced."""
    if model is not None:
        save_model(model, str(tmp / "model.safetensors"))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng_state, tmp / "rng.pt")
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr)
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    sums = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in _files(tmp)}
    (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2))
    for p in _files(tmp):
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


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


def _out_of_space(e: BaseException) -> bool:
    # safetensors and torch.save report a full disk as their own errors, naming the OS error.
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(e)
    return "No space left" in text or "code: 28" in text or "Disk quota" in text


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


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


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


def load_checkpoint(folder: Path, model: torch.nn.Module | None, device) -> dict:
    """Load the weights into `model` and return the rest (state, optimizer, rng, arrays);
    with `model=None` (sharded checkpoints) weights and optimizer are left to the caller."""
    try:
        optimizer_state = None
        if model is not None:
            load_model(model, str(folder / "model.safetensors"), device=str(device))
            optimizer_state = torch.load(
                folder / "optimizer.pt", map_location=device, weights_only=True
            )
        rng_state = torch.load(folder / "rng.pt", weights_only=True)
        state = json.loads((folder / "trainer_state.json").read_text())
        arrays = {p.stem: np.load(p, allow_pickle=False) for p in folder.glob("*.npy")}
    except Exception as e:  # a checkpoint that passed its checksums but does not fit the model
        raise DDKError(f"cannot load checkpoint '{folder}': {first_line(e)}") from None
    return {"state": state, "optimizer": optimizer_state, "rng": rng_state, "arrays": arrays}


# ---------------------------------------------------------------- sharded backends
SHARDED = "sharded"  # FSDP2: the torch.distributed.checkpoint folder inside a checkpoint
DEEPSPEED = "deepspeed"  # DeepSpeed ZeRO: the engine's checkpoint folder inside a checkpoint
DEEPSPEED_TAG = "state"


def sharded_states_dir(folder: Path) -> Path | None:
    """The folder of sharded states a checkpoint holds, or None for whole states."""
    for name in (SHARDED, DEEPSPEED):
        if (folder / name).is_dir():
            return folder / name
    return None


def _bare(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper -> torch's


def save_sharded_states(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """Every rank writes its own shard of the model and optimizer states (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _bare(optimizer))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))


def load_sharded_states(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """Read the shards into the (already sharded) model and optimizer; DCP reshards when the
    saved and current layouts differ."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, _bare(optimizer))
    both = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(both, checkpoint_id=str(folder))
    except Exception as e:
        raise DDKError(f"cannot load sharded states from '{folder}': {first_line(e)}") from None
    set_state_dict(
        model, _bare(optimizer), model_state_dict=both["model"], optim_state_dict=both["optim"]
    )


def save_deepspeed_states(folder: Path, engine) -> None:
    """Every rank writes its ZeRO partitions (model, fp32 master weights, Adam moments) through
    the engine (a collective). ddk's own scheduler, sampler and RNG are saved beside them."""
    engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, client_state={}, save_latest=False)


def load_deepspeed_states(folder: Path, engine) -> None:
    try:
        path, _ = engine.load_checkpoint(
            str(folder),
            tag=DEEPSPEED_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    except Exception as e:
        raise DDKError(f"cannot load DeepSpeed states from '{folder}': {first_line(e)}") from None
    if path is None:
        raise DDKError(f"cannot load DeepSpeed states from '{folder}': no checkpoint found")


def deepspeed_fp32_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 state dict, consolidated from a ZeRO-2/3 checkpoint's master weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_TAG)


def agreed_latest_good_checkpoint(run_dir: Path, log=print) -> Path | None:
    """`latest_good_checkpoint` checked once, on rank 0, and its verdict given to every rank
    (the checksums are not re-hashed by each process)."""
    from accelerate.utils import broadcast_object_list

    from ddk.runtime import partial_state

    state = partial_state()
    if state.num_processes == 1:
        return latest_good_checkpoint(run_dir, log)
    box = [latest_good_checkpoint(run_dir, log) if state.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]
