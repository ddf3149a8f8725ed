"""Where the frozen teacher lives across processes.

    replicated   every rank holds the whole teacher on its device (fastest; DDP-style)
    sharded      FSDP2 `fully_shard`, forward only (no optimizer): each rank holds 1/world of
                 the decoder layers and gathers one layer at a time
    cpu_offload  sharded, with the shards kept in CPU memory and copied in layer by layer
    auto         replicated when the teacher fits, else sharded

The LM head stays whole on every rank under every placement: the fused loss multiplies
each chunk of hidden states by the whole head anyway.
"""

from __future__ import annotations

import torch

from ddk.errors import DDKError

# A replicated teacher may take this share of the free device memory; the rest is left to
# the student, its optimizer states and activations.
FIT_SHARE = 0.5


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def choose_placement(
    requested: str,
    *,
    teacher_bytes: int,
    free_bytes: int | None,
    world_size: int,
) -> tuple[str, str]:
    """(placement, why). `free_bytes` None means no accelerator (CPU run). Unsupported
    combinations raise DDKError with one line saying what to change."""
    if requested in ("sharded", "cpu_offload"):
        if world_size < 2:
            raise DDKError(
                f"teacher.placement={requested} needs a distributed launch (accelerate launch / "
                "torchrun with 2+ processes); use teacher.placement=replicated for one process"
            )
        return requested, "as configured"
    if requested == "replicated":
        return "replicated", "as configured"
    # auto
    gib = teacher_bytes / 2**30
    if free_bytes is None:
        return "replicated", f"CPU run: teacher ({gib:.2f} GiB) in host memory"
    budget = FIT_SHARE * free_bytes
    if teacher_bytes <= budget or world_size < 2:
        why = "fits" if teacher_bytes <= budget else "does not fit, but cannot be sharded here"
        return "replicated", (
            f"teacher {gib:.2f} GiB {why} ({FIT_SHARE:.0%} of {free_bytes / 2**30:.1f} GiB free)"
        )
    return "sharded", (
        f"teacher {gib:.2f} GiB > {FIT_SHARE:.0%} of {free_bytes / 2**30:.1f} GiB free: "
        f"sharded over {world_size} processes"
    )


def _layer_classes(model: torch.nn.Module) -> set[type]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def shard_teacher(model: torch.nn.Module, device: torch.device, offload: bool) -> torch.nn.Module:
    """FSDP2 over the teacher's decoder layers and its base model, forward only. The base
    model is the root (ddk calls `model.base_model` directly); the LM head is kept whole."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    layers = _layer_classes(model)
    if not layers:
        raise DDKError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules); use "
            "teacher.placement=replicated"
        )
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    # reshard_after_forward=True everywhere (the root too): there is no backward to reuse
    # the gathered weights, so each layer is freed as soon as its forward is done.
    kwargs = {"reshard_after_forward": True, "offload_policy": policy}
    for module in list(model.base_model.modules()):
        if type(module) in layers:
            fully_shard(module, **kwargs)
    head = model.get_output_embeddings()
    fully_shard(model.base_model, **kwargs, ignored_params={head.weight})
    head.to(device)  # whole on every rank (with tied weights: the shared embedding too)
    # Buffers (e.g. rotary tables) are used where the compute runs, offloaded or not.
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            setattr(module, name, buf.to(device))
    return model


def place_teacher(model: torch.nn.Module, requested: str, runtime, log=print) -> torch.nn.Module:
    """The teacher placed as `teacher.placement` asks, with a one-line log of the choice."""
    device = runtime.device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    placement, why = choose_placement(
        requested,
        teacher_bytes=parameter_bytes(model),
        free_bytes=free,
        world_size=runtime.world_size,
    )
    total = parameter_bytes(model)
    if placement == "replicated":
        model = model.to(device)
    else:
        model = shard_teacher(model, device, offload=placement == "cpu_offload")
    if runtime.is_main:
        log(
            f"teacher placement: {placement} ({why}); this rank holds {local_bytes(model)} of "
            f"{total} parameter bytes"
        )
    return model


def local_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes this rank stores (its shards only, for sharded parameters)."""
    from torch.distributed.tensor import DTensor

    return sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
        for p in model.parameters()
    )
