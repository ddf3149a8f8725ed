"""The final student, written the way checkpoints are: into a temporary folder, then renamed to
`RUN/final`, so that folder holds a whole model or none. A full disk is one line, and the
checkpoint saved just before stays the place to resume from."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

from ddk.checkpoint import _fsync_dir, _mb, _out_of_space
from ddk.errors import DDKError, first_line


def save_final(run_dir: Path, model, tokenizer) -> Path:
    final = run_dir / "final"
    for stale in [*run_dir.glob(".tmp-final-*"), *run_dir.glob(".old-final-*")]:  # killed saves
        shutil.rmtree(stale, ignore_errors=True)
    tmp = run_dir / f".tmp-final-{os.getpid()}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except (OSError, SafetensorError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        free = shutil.disk_usage(run_dir).free
        resume = f"ddk distill --resume {run_dir}"
        if _out_of_space(e) or free < need:
            raise DDKError(
                f"disk full while saving the final student to '{final}': it needs about "
                f"{_mb(need)}, {_mb(free)} is free; free space and run `{resume}` (the last "
                "checkpoint is intact)"
            ) from None
        if not isinstance(e, OSError):
            raise
        raise DDKError(
            f"cannot save the final student to '{final}': {e.strerror or first_line(e)}"
        ) from None
    old = None
    if final.exists():  # a resumed run saving again: the old one goes once the new is in place
        old = run_dir / f".old-final-{os.getpid()}"
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(run_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final
