"""Everything Accelerate-specific, behind one small seam: building the accelerator and checking
its backend, prepare/unwrap, reductions, barriers, broadcasts and full state dicts.

The trainer and evaluation talk to a `Runtime`, never to Accelerate or torch.distributed
directly, so a backend (DDP, FSDP2) changes this file, not the recipe.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ddk.errors import DDKError

SUPPORTED = ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP")


def check_backend(distributed_type: str, is_fsdp2: bool) -> None:
    """One line saying what to change when Accelerate is set up for a backend ddk cannot run."""
    if distributed_type == "DEEPSPEED":
        raise DDKError(
            "DeepSpeed is not supported yet (its engine steps the optimizer itself, which ddk's "
            "accumulation and skipped steps need to own); use FSDP2: accelerate launch "
            "--config_file examples/accelerate/fsdp2.yaml"
        )
    if distributed_type not in SUPPORTED:
        raise DDKError(
            f"Accelerate is set up for {distributed_type}; ddk supports DDP and FSDP2 (see "
            "examples/accelerate/)"
        )
    if distributed_type == "FSDP" and not is_fsdp2:
        raise DDKError(
            "Accelerate is set up for FSDP version 1; ddk supports FSDP2: set fsdp_version: 2 "
            "in the accelerate config (or FSDP_VERSION=2)"
        )


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
        if not cuda:
            _enable_cpu_fsdp(acc)
        if acc.gradient_accumulation_steps != 1:
            raise DDKError(
                "Accelerate is configured with gradient_accumulation_steps="
                f"{acc.gradient_accumulation_steps}; set it to 1 and use trainer.grad_accum_steps"
            )
        check_backend(acc.distributed_type.value, acc.is_fsdp2)
        if acc.is_fsdp2 and bf16:
            # Accelerate's bf16 policy also reduces gradients in bf16; ddk reduces in fp32
            # (the loss is a sum over the global batch, normalised once).
            from torch.distributed.fsdp import MixedPrecisionPolicy

            acc.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32
            )
        self.distributed_type = acc.distributed_type
        # "ddp" covers one process too: every rank holds whole weights and optimizer states.
        self.backend = "fsdp2" if acc.distributed_type == DistributedType.FSDP else "ddp"

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

    @property
    def is_sharded(self) -> bool:
        """Model and optimizer states are split over ranks (FSDP2 / DeepSpeed)."""
        return self.backend != "ddp"

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
        """The whole (unsharded) state dict; on rank 0 for sharded backends (a collective:
        every rank must call it)."""
        return self.accelerator.get_state_dict(module)

    @contextlib.contextmanager
    def gathered(self, module: torch.nn.Module):
        """`module`'s own (root) parameters unsharded for the block, so code may use a
        sub-module directly (e.g. `student.base_model` and `lm_head.weight` in evaluation)
        instead of the wrapper's forward. Decoder layers still gather themselves in their own
        forward. Every rank must enter it (FSDP2 all-gathers)."""
        from torch.distributed.fsdp import FSDPModule

        if self.backend != "fsdp2" or not isinstance(module, FSDPModule):
            yield
            return
        # The root must be known before any layer runs outside its forward (else each layer
        # would make itself a root): FSDP2 does this lazily in the root's first forward.
        module._get_fsdp_state()._lazy_init()
        module.unshard()
        try:
            yield
        finally:
            module.reshard()

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


def _enable_cpu_fsdp(accelerator) -> None:
    """Accelerate turns on FSDP only for GPUs; with `ACCELERATE_USE_FSDP=true` on a CPU
    launch (gloo) ddk switches the same Accelerate FSDP2 path on, so the sharded code runs
    and is tested on CPUs. fully_shard itself supports CPU meshes."""
    from accelerate import FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
        or state.distributed_type != DistributedType.MULTI_CPU
    ):
        return
    # Both shared states: every later AcceleratorState() copies PartialState's fields over.
    PartialState().distributed_type = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables


def plain_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) copy of a Hugging Face model holding `state_dict`, for
    `save_pretrained`: the sharded original's parameters are DTensors, which it cannot save."""
    with torch.device("meta"):  # the same class (remote-code models too), no memory yet
        copy = type(model)(model.config)
    copy.load_state_dict(state_dict, assign=True, strict=False)
    copy.tie_weights()
    missing = [n for n, p in copy.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"gathered state dict lacks {missing[:3]}")
    return copy
