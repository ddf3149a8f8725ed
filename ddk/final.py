"""The final student, written the way checkpoints are: into a temporary folder, then renamed to
`RUN/final`, so that folder holds a whole model or none. A full disk is one line, and the
checkpoint saved just before stays the place to resume from. A LoRA student's final/ is the
merged model, with its adapter in final/adapter."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

from ddk.config import ModelSection
from ddk.errors import DDKError, first_line
from ddk.fileutil import disk_full, human_bytes, publish_dir
from ddk.lora import merged_state_dict, save_adapter
from ddk.runtime import plain_copy

ADAPTER_DIR = "adapter"  # final/adapter: a LoRA run's adapter, for PeftModel.from_pretrained


def whole_student(runtime, module, model: ModelSection, saved: Path | None = None):
    """(the whole student as a plain model, a writer of final/adapter or None) on rank 0,
    (None, None) on the others; a collective under sharded backends. A LoRA student is
    merged (base + alpha/r · B @ A) from its whole state dict, so final/ and the benchmark
    scores see one plain model under every backend."""
    if model.lora is None:
        return runtime.whole_model(module, "student", saved), None
    full = runtime.whole_state_dict(module, "student", saved)
    if not runtime.is_main:
        return None, None
    student = runtime.unwrap(module).student
    merged = plain_copy(student, merged_state_dict(full, model.lora))
    return merged, lambda folder: save_adapter(folder, full, model.lora, model.student)


def save_final(run_dir: Path, model, tokenizer, adapter=None) -> Path:
    """`adapter`: writes a LoRA run's adapter into the folder it is given (final/adapter)."""
    final = run_dir / "final"
    for stale in [*run_dir.glob(".tmp-final-*"), *run_dir.glob(".old-final-*")]:  # killed saves
        shutil.rmtree(stale, ignore_errors=True)
    tmp = run_dir / f".tmp-final-{os.getpid()}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if adapter is not None:
            adapter(tmp / ADAPTER_DIR)
    except (OSError, SafetensorError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        free = shutil.disk_usage(run_dir).free
        resume = f"ddk distill --resume {run_dir}"
        if disk_full(e) or free < need:
            raise DDKError(
                f"disk full while saving the final student to '{final}': it needs about "
                f"{human_bytes(need, 'MiB')}, {human_bytes(free, 'MiB')} is free; free space and "
                f"run `{resume}` (the last checkpoint is intact)"
            ) from None
        if not isinstance(e, OSError):
            raise
        raise DDKError(
            f"cannot save the final student to '{final}': {e.strerror or first_line(e)}"
        ) from None
    # A resumed run saving again: the old one goes once the new is in place.
    publish_dir(tmp, final, aside=run_dir / f".old-final-{os.getpid()}")
    return final
