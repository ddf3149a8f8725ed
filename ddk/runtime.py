"""Everything Accelerate-specific, behind one small seam: building the accelerator and checking
its backend, prepare/unwrap, reductions, barriers, broadcasts and full state dicts.

The trainer and evaluation talk to a `Runtime`, never to Accelerate or torch.distributed
directly, so a backend (DDP today; FSDP2 / DeepSpeed) changes this file, not the recipe.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ddk.errors import DDKError


class Runtime:
    def __init__(self, cpu: bool | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        # ddk accumulates gradients itself (and normalises by the step's global token count);
        # Accelerate's own accumulation would silently divide the loss again.
        accum = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
        if accum not in (None, "", "1"):
            raise DDKError(
                f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS={accum} is set; ddk does its own "
                "accumulation: unset it (or set 1) and use trainer.grad_accum_steps"
            )
        cuda = torch.cuda.is_available() if cpu is None else not cpu
        bf16 = cuda and torch.cuda.is_bf16_supported()
        self.accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not cuda)
        acc = self.accelerator
        if acc.gradient_accumulation_steps != 1:
            raise DDKError(
                "Accelerate is configured with gradient_accumulation_steps="
                f"{acc.gradient_accumulation_steps}; set it to 1 and use trainer.grad_accum_steps"
            )
        supported = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
        if acc.distributed_type not in supported:
            raise DDKError(
                f"Accelerate is set up for {acc.distributed_type.value}; ddk supports DDP for now "
                "(run `accelerate launch` without FSDP/DeepSpeed)"
            )
        self.distributed_type = acc.distributed_type

    # ------------------------------------------------------------------ topology
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # ------------------------------------------------------------------ models
    def prepare(self, *objects):
        return self.accelerator.prepare(*objects)

    def unwrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(module)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self, module: torch.nn.Module, skip_sync: bool):
        """Skip the gradient all-reduce for all but the last micro-batch of a step."""
        return self.accelerator.no_sync(module) if skip_sync else contextlib.nullcontext()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    def full_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole (unsharded) state dict; on rank 0 for sharded backends."""
        return self.accelerator.get_state_dict(module)

    # ------------------------------------------------------------------ collectives
    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def broadcast_object(self, obj, src: int = 0):
        """Rank `src`'s `obj` on every rank (e.g. a verdict only rank 0 computed)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]
