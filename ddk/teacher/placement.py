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

import os

import torch
from accelerate import init_empty_weights
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM

from ddk.errors import DDKError, first_line
from ddk.logits import logit_transform, remember_logit_transform
from ddk.models import load_teacher, resolve_dtype, resolve_local_path, whole_weights

# A replicated teacher may take this share of the free device memory; the rest is left to
# the student, its optimizer states and activations.
FIT_SHARE = 0.5


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def launch_problem(requested: str, world_size: int) -> str | None:
    """Why `requested` cannot place a teacher on `world_size` processes (None: it can)."""
    if requested in ("sharded", "cpu_offload") and world_size < 2:
        return (
            f"teacher.placement={requested} needs a distributed launch (accelerate launch / "
            "torchrun with 2+ processes); use teacher.placement=replicated for one process"
        )
    return None


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
        problem = launch_problem(requested, world_size)
        if problem:
            raise DDKError(problem)
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


def _fully_shard(model: torch.nn.Module, device: torch.device, offload: bool) -> None:
    """FSDP2 over the teacher's decoder layers and its base model, forward only. The base
    model is the root (ddk calls `model.base_model` directly); the LM head is kept whole."""
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


def _to_compute_device(model: torch.nn.Module, device: torch.device) -> None:
    # The head is whole on every rank (with tied weights: the shared embedding too), and
    # buffers (e.g. rotary tables) are used where the compute runs, offloaded or not.
    model.get_output_embeddings().to(device)
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            setattr(module, name, buf.to(device))


def _set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, value)


def teacher_skeleton(name: str, *, dtype: torch.dtype, trust_remote_code: bool = False):
    """The teacher's architecture with parameters on the meta device (no memory, no reads of
    the weight files) and real buffers (rotary tables are computed from the config)."""
    path = resolve_local_path(name, "teacher")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with whole_weights(), init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError) as e:
        raise DDKError(f"cannot load teacher '{name}': {first_line(e)}") from None
    # Tie now, as from_pretrained would: a tied head is the (whole, unsharded) embedding.
    model.tie_weights()
    return model.eval().requires_grad_(False)


def _load_sharded(
    name: str, skeleton, *, dtype, trust_remote_code: bool, runtime, offload: bool
) -> torch.nn.Module:
    """Rank 0 reads the weights; every rank shards the skeleton and receives its shards (and
    the whole head) by broadcast. Host memory holds one whole teacher per launch."""
    full: dict[str, torch.Tensor] = {}

    def read_on_rank0():
        whole = load_teacher(name, dtype=dtype, trust_remote_code=trust_remote_code)
        full.update(whole.state_dict())
        return logit_transform(whole)  # probed on the whole model, remembered on the shards

    transform = runtime.main_result(read_on_rank0)
    device = runtime.device
    model = skeleton
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    _fully_shard(model, device, offload)
    # One device for every local tensor while loading (shards, head and buffers alike).
    load_device = torch.device("cpu") if offload else device
    model.to_empty(device=load_device)
    for n, b in buffers.items():
        _set_buffer(model, n, b.to(load_device))
    set_model_state_dict(
        model,
        full,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    full.clear()  # rank 0's whole copy: freed as soon as every rank has its shards
    model.tie_weights()  # to_empty may have given tied parameters separate storage
    _to_compute_device(model, device)
    remember_logit_transform(model, transform)
    return model


def load_placed_teacher(
    name: str, *, dtype: torch.dtype, trust_remote_code: bool, requested: str, runtime, log=print
) -> torch.nn.Module:
    """The frozen teacher, loaded and placed as `teacher.placement` asks, with a one-line log
    of the choice. The choice is made from the architecture alone (a meta-device skeleton),
    before any weights are read; sharded placements read them on rank 0 only."""
    device = runtime.device
    skeleton = teacher_skeleton(name, dtype=dtype, trust_remote_code=trust_remote_code)
    total = parameter_bytes(skeleton)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    placement, why = choose_placement(
        requested, teacher_bytes=total, free_bytes=free, world_size=runtime.world_size
    )
    # Rank 0 decides for all: free memory differs per GPU, and a split decision would leave
    # the sharded ranks waiting in a broadcast the replicated ones never join.
    placement, why = runtime.broadcast_object((placement, why))
    if placement == "replicated":
        del skeleton
        model = load_teacher(name, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
        source = "read by every rank"
    else:
        model = _load_sharded(
            name,
            skeleton,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            runtime=runtime,
            offload=placement == "cpu_offload",
        )
        source = "read by rank 0 only"
    if runtime.is_main:
        log(
            f"teacher placement: {placement} ({why}); this rank holds {local_bytes(model)} of "
            f"{total} parameter bytes; weights {source}"
        )
    return model


def load_configured_teacher(cfg, runtime, name: str | None = None) -> torch.nn.Module:
    """The run's teacher `name` (default `model.teacher`; with `model.teachers`, each domain's
    own) in `model.dtype`, placed as `teacher.placement` asks: how training, its perplexities
    and `ddk cache-teacher` all load it."""
    return load_placed_teacher(
        name or cfg.model.teacher,
        dtype=resolve_dtype(cfg.model.dtype, runtime.device),
        trust_remote_code=cfg.model.trust_remote_code,
        requested=cfg.teacher.placement,
        runtime=runtime,
    )


def teachers_fit_problem(
    sizes: dict[str, int], requested: str, *, free_bytes: int | None, world_size: int
) -> str | None:
    """Why the teachers of `sizes` ({teacher: parameter bytes}), all held at once, cannot fit
    the devices given (None: they fit, or a CPU run, whose host memory is not checked).

    Each teacher is placed as `requested`; together they may take FIT_SHARE of the free
    device memory, as one teacher may: replicated, every rank holds them all; sharded (and
    auto on 2+ processes), each rank holds 1/world of them; cpu_offload keeps the shards in
    host memory, so only the LM heads and one layer at a time reach the device."""
    if free_bytes is None or requested == "cpu_offload" or len(sizes) < 2:
        return None
    total = sum(sizes.values())
    budget = FIT_SHARE * free_bytes
    sharded = requested == "sharded" or (requested == "auto" and world_size >= 2)
    per_rank = total / world_size if sharded else total
    if per_rank <= budget:
        return None
    gib = 2**30
    how = f"sharded over {world_size} processes" if sharded else "replicated"
    fix = (
        "use teacher.placement=cpu_offload, more processes, or fewer teachers"
        if sharded
        else "launch 2+ processes with teacher.placement=sharded or auto, or use fewer teachers"
    )
    return (
        f"model.teachers: {len(sizes)} teachers ({total / gib:.2f} GiB) {how} need "
        f"{per_rank / gib:.2f} GiB per device, over {FIT_SHARE:.0%} of the "
        f"{free_bytes / gib:.1f} GiB free; {fix}"
    )


def teachers_placement_problem(cfg, teachers: dict[str, str]) -> str | None:
    """`teachers_fit_problem` for the run's teachers ({role: name}), sized from their
    architectures alone (meta-device skeletons: no weights read), on this launch's devices
    (WORLD_SIZE processes; the free memory of this process's GPU, None without one)."""
    device = _launch_device()
    dtype = resolve_dtype(cfg.model.dtype, device)
    sizes = {
        name: parameter_bytes(
            teacher_skeleton(name, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
        )
        for name in teachers.values()
    }
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return teachers_fit_problem(sizes, cfg.teacher.placement, free_bytes=free, world_size=world)


def launch_placement_problem(cfg) -> str | None:
    """`launch_problem` for this launch (WORLD_SIZE processes), checked before any weights
    load whenever a live teacher will be placed."""
    if cfg.teacher.mode != "online" or cfg.teacher.engine != "hf":
        return None
    return launch_problem(cfg.teacher.placement, int(os.environ.get("WORLD_SIZE", "1")))


def _launch_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def local_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes this rank stores (its shards only, for sharded parameters)."""
    return sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
        for p in model.parameters()
    )


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the teacher was placed sharded (its forwards are then collectives)."""
    return any(isinstance(m, FSDPModule) for m in model.modules())
