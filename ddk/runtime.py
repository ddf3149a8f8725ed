"""Everything backend-specific, behind one small seam: building the accelerator and checking its
backend, prepare/unwrap, backward and the optimizer step, reductions, barriers, broadcasts, and
saving/loading the model and optimizer states of every backend (whole, FSDP2 through
torch.distributed.checkpoint, DeepSpeed ZeRO through its engine).

The trainer, the checkpointer, evaluation and the teacher talk to a runtime, never to Accelerate
or torch.distributed directly, so a backend (DDP, FSDP2, DeepSpeed ZeRO-2/3) changes this file,
not the recipe. `LocalRuntime` is the one-process runtime (no Accelerate) that `ddk eval` and the
tests use; `Runtime` is the Accelerate one, and either can be substituted.

ddk owns gradient accumulation (the loss is a sum normalised once by the step's global token
count), the skipped step on a NaN/inf loss or gradient, AdamW and the learning-rate schedule,
under every backend. DeepSpeed's engine would own all four; here it is told the boundaries
explicitly and only its ZeRO partitioning, reduction and optimizer wrapping are used.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from ddk import ranks
from ddk.checkpoint import DEEPSPEED, DEEPSPEED_TAG, SHARDED
from ddk.errors import DDKError, first_line

SUPPORTED = ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED")
ZERO_STAGES = (2, 3)
STATE_KINDS = {SHARDED: "FSDP2", DEEPSPEED: "DeepSpeed", None: "whole (DDP)"}


class LocalRuntime:
    """One process, no Accelerate: what evaluation and the teacher need from a runtime
    (rank, world size, reductions, broadcasts, autocast), all trivial."""

    backend = "local"
    is_sharded = False

    def __init__(self, device: torch.device | str | None = None):
        self._device = torch.device(device) if device is not None else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self._device

    rank = 0
    world_size = 1
    is_main = True

    def autocast(self):
        return contextlib.nullcontext()

    def gathered_head(self):
        return contextlib.nullcontext()

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj, src: int = 0):
        return obj

    def main_result(self, fn):
        return fn()


def check_backend(
    distributed_type: str, is_fsdp2: bool, deepspeed_config: dict | None = None
) -> None:
    """One line saying what to change when Accelerate is set up for a backend ddk cannot run."""
    if distributed_type not in SUPPORTED:
        raise DDKError(
            f"Accelerate is set up for {distributed_type}; ddk supports DDP, FSDP2 and DeepSpeed "
            "ZeRO-2/3 (see examples/accelerate/)"
        )
    if distributed_type == "DEEPSPEED":
        check_deepspeed_config(deepspeed_config or {})
    if distributed_type == "FSDP" and not is_fsdp2:
        raise DDKError(
            "Accelerate is set up for FSDP version 1; ddk supports FSDP2: set fsdp_version: 2 "
            "in the accelerate config (or FSDP_VERSION=2)"
        )


def check_deepspeed_config(config: dict) -> None:
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in ZERO_STAGES:
        raise DDKError(
            f"DeepSpeed ZeRO stage {stage} is not supported; set zero_stage: 2 or 3 "
            "(see examples/accelerate/zero3.yaml), or use DDP for whole weights on every GPU"
        )
    for section, owner in (
        ("optimizer", "trainer.lr and trainer.adam_*"),
        ("scheduler", "trainer.lr, warmup_steps and min_lr"),
    ):
        if section in config:
            raise DDKError(
                f"the DeepSpeed config has an '{section}' section; ddk builds AdamW and its "
                f"learning-rate schedule itself: remove it and set {owner} in the ddk config"
            )
    if config.get("fp16", {}).get("enabled") in (True, "true"):
        raise DDKError(
            "DeepSpeed fp16 (loss scaling) is not supported; use bf16 (mixed_precision: bf16)"
        )
    if config.get("bf16", {}).get("check_grad_overflow") in (False, "false"):
        raise DDKError(
            "the DeepSpeed config sets bf16.check_grad_overflow: false, which would apply "
            "steps with NaN/inf gradients; remove it (ddk skips such steps)"
        )


def _state_kwargs(cuda: bool) -> dict:
    """How Accelerate's shared state is built. Accelerate turns DeepSpeed on only when not told
    `cpu=True`; on a CPU-only launch it then finds no backend, so gloo is named, which
    DeepSpeed's CPU accelerator also uses."""
    if cuda:
        return {"cpu": False}
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return {"cpu": False, "backend": "gloo"}
    return {"cpu": True}


def _check_accumulation_unset() -> None:
    # ddk accumulates gradients itself (and normalises by the step's global token count);
    # Accelerate's own accumulation would silently divide the loss again.
    accum = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if accum not in (None, "", "1"):
        raise DDKError(
            f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS={accum} is set; ddk does its own "
            "accumulation: unset it (or set 1) and use trainer.grad_accum_steps"
        )


class Runtime:
    """The Accelerate runtime: DDP (or one process), FSDP2 or DeepSpeed ZeRO-2/3."""

    def __init__(self, cpu: bool | None = None):
        _check_accumulation_unset()
        cuda = torch.cuda.is_available() if cpu is None else not cpu
        bf16 = cuda and torch.cuda.is_bf16_supported()
        state = _state_kwargs(cuda)
        handlers = [InitProcessGroupKwargs(backend=state["backend"])] if "backend" in state else []
        self.accelerator = Accelerator(
            mixed_precision="bf16" if bf16 else "no", cpu=state["cpu"], kwargs_handlers=handlers
        )
        acc = self.accelerator
        if not cuda:
            _enable_cpu_fsdp(acc)
        if acc.gradient_accumulation_steps != 1:
            raise DDKError(
                "Accelerate is configured with gradient_accumulation_steps="
                f"{acc.gradient_accumulation_steps}; set it to 1 and use trainer.grad_accum_steps"
            )
        ds_plugin = acc.state.deepspeed_plugin
        check_backend(
            acc.distributed_type.value,
            acc.is_fsdp2,
            ds_plugin.deepspeed_config if ds_plugin is not None else None,
        )
        if acc.is_fsdp2 and bf16:
            # Accelerate's bf16 policy also reduces gradients in bf16; ddk reduces in fp32
            # (the loss is a sum over the global batch, normalised once).
            acc.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32
            )
        # "ddp" covers one process too: every rank holds whole weights and optimizer states.
        self.backend = {
            DistributedType.FSDP: "fsdp2",
            DistributedType.DEEPSPEED: "deepspeed",
        }.get(acc.distributed_type, "ddp")
        self.zero_stage = ds_plugin.zero_stage if ds_plugin is not None else None
        self._external_params: list[torch.nn.Parameter] = []

    # ------------------------------------------------------------------ topology
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world_size(self) -> int:
        return ranks.world_size()

    @property
    def rank(self) -> int:
        return ranks.rank()

    @property
    def is_main(self) -> bool:
        return ranks.is_main()

    @property
    def is_sharded(self) -> bool:
        """Model and optimizer states are split over ranks (FSDP2 / DeepSpeed)."""
        return self.backend != "ddp"

    # ------------------------------------------------------------------ models
    def prepare_training(self, module, optimizer, *, micro_batch_size, grad_accum_steps, grad_clip):
        """Wrap the step module and its optimizer for the backend. DeepSpeed is told ddk's
        batch geometry and clipping, which it checks and applies in its own step."""
        if self.backend == "deepspeed":
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            config["train_micro_batch_size_per_gpu"] = micro_batch_size
            config["gradient_accumulation_steps"] = grad_accum_steps
            config["train_batch_size"] = micro_batch_size * grad_accum_steps * self.world_size
            config["gradient_clipping"] = grad_clip if grad_clip > 0 else 0.0
            config["steps_per_print"] = float("inf")  # ddk logs its own steps
            if self.accelerator.mixed_precision == "bf16":
                # Reduce and accumulate gradients in fp32, as under FSDP2 (DeepSpeed's
                # default is bf16); a user's explicit setting is kept.
                config.setdefault("communication_data_type", "fp32")
                config.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
            # Accelerate compares its own count with the config's; its backward is not used.
            self.accelerator.gradient_accumulation_steps = grad_accum_steps
        return self.accelerator.prepare(module, optimizer)

    @property
    def _engine(self):
        return self.accelerator.deepspeed_engine_wrapped.engine

    def register_external(self, module: torch.nn.Module, params) -> None:
        """`params` are used by `module`'s forward outside their own sub-module's forward (the
        fused loss multiplies by the LM head's weight directly). ZeRO-3 must gather them for
        that forward and its backward; FSDP2 and ZeRO-2 need nothing (the head is whole or
        gathered by the root)."""
        params = [p for p in params if p is not None]
        self._external_params = params
        if self.backend == "deepspeed" and self.zero_stage == 3:
            from deepspeed.runtime.zero import register_external_parameter  # optional extra

            for p in params:
                register_external_parameter(module, p)

    def unwrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(module)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        if self.backend == "deepspeed":
            # ddk already scaled the loss for its accumulation: DeepSpeed must not divide it
            # by gradient_accumulation_steps again (and must not step: `optimizer_step` does).
            self._engine.backward(loss, scale_wrt_gas=False)
            return
        self.accelerator.backward(loss)

    def no_sync(self, module: torch.nn.Module, skip_sync: bool):
        """Skip the gradient all-reduce for all but the last micro-batch of a step."""
        if self.backend == "deepspeed":
            self._engine.set_gradient_accumulation_boundary(not skip_sync)
            return contextlib.nullcontext()
        return self.accelerator.no_sync(module) if skip_sync else contextlib.nullcontext()

    def optimizer_step(self, module, optimizer, max_norm: float, loss_finite: bool):
        """Clip, then step unless the loss or the gradient norm is NaN/inf; clear gradients.
        Returns (gradient norm before clipping, whether the step was applied)."""
        if self.backend == "deepspeed":
            return self._deepspeed_step(optimizer, loss_finite)
        grad_norm = float(self.accelerator.clip_grad_norm_(module.parameters(), max_norm))
        applied = loss_finite and math.isfinite(grad_norm)
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied

    def _deepspeed_step(self, optimizer, loss_finite: bool):
        # ddk decides the skip itself: DeepSpeed's own overflow check is not to be relied on
        # (ZeRO-3 before 0.19.8 checks it in fp16 only and turns a NaN norm into a -1
        # sentinel, and a NaN loss with finite gradients passes every version's check).
        engine = self._engine
        with _gated_inner_step(engine.optimizer, loss_finite, self) as gate:
            engine.step()
        optimizer.step()  # a no-op wrapper under DeepSpeed; keeps the LR scheduler's count
        norm = engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None and norm >= 0 else math.nan
        if gate.gradients_finite is False:
            grad_norm = math.nan
        applied = loss_finite and engine.was_step_applied() and gate.gradients_finite is not False
        return grad_norm, applied

    # ------------------------------------------------------------------ checkpoint states
    @property
    def states_dirname(self) -> str | None:
        """The folder inside a checkpoint that holds sharded model and optimizer states
        (None: whole states, written by rank 0 as model.safetensors and optimizer.pt)."""
        return {"fsdp2": SHARDED, "deepspeed": DEEPSPEED}.get(self.backend)

    def save_states(self, folder: Path, module, optimizer) -> None:
        """Sharded backends: every rank writes its shard of the model and optimizer states
        into `folder`/<states_dirname> (a collective). Whole states: nothing to do here."""
        if self.backend == "deepspeed":
            # The engine writes its ZeRO partitions (model, fp32 master weights, Adam moments);
            # ddk's own scheduler, sampler and RNG are saved beside them.
            self._engine.save_checkpoint(
                str(folder / DEEPSPEED), tag=DEEPSPEED_TAG, client_state={}, save_latest=False
            )
        elif self.backend == "fsdp2":
            model_sd, optim_sd = _trainable_state_dicts(module, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder / SHARDED))

    def whole_states(self, model: torch.nn.Module, optimizer) -> dict:
        """What rank 0 writes itself: the model and optimizer state of whole-state backends."""
        if self.is_sharded:
            return {}
        return {"model": model, "optimizer_state": optimizer.state_dict()}

    def check_resumable(self, folder: Path, states: Path | None, saved_processes: int) -> None:
        """Refuse, in one line, a checkpoint this launch's backend cannot load."""
        saved_kind = states.name if states is not None else None
        if saved_kind != self.states_dirname:
            raise DDKError(
                f"checkpoint '{folder}' holds {STATE_KINDS.get(saved_kind)} states but this "
                f"launch uses {self.backend}; resume with the accelerate config it ran with"
            )
        if saved_kind == DEEPSPEED and saved_processes != self.world_size:
            raise DDKError(
                f"checkpoint '{folder}' holds DeepSpeed ZeRO partitions of {saved_processes} "
                f"processes; resume with {saved_processes} processes (ZeRO partitions are not "
                "resharded; DDP and FSDP2 checkpoints are)"
            )

    def load_states(self, folder: Path, module, optimizer) -> None:
        """Read the shards in `folder` into the (already sharded) model and optimizer; DCP
        reshards when the saved and current layouts differ. Every rank agrees on failure."""
        problem = None
        try:
            if self.backend == "deepspeed":
                _load_deepspeed(folder, self._engine)
            else:
                _load_dcp(folder, module, optimizer)
        except DDKError as e:
            problem = str(e)
        # A rank that failed alone must not leave the others waiting in the next collective.
        failed = self.reduce_sum(torch.tensor([float(problem is not None)], device=self.device))
        if float(failed[0]) > 0:
            raise DDKError(problem or f"cannot load the states in '{folder}' on another rank")

    def whole_model(self, module: torch.nn.Module, attribute: str, saved: Path | None = None):
        """`module.<attribute>` as a plain model with whole weights, on rank 0 (None on the
        others), for `save_pretrained`. A collective under sharded backends: every rank must
        call it. DeepSpeed: read from `saved`, the checkpoint just written, whose optimizer
        holds the fp32 master weights (the module may be bf16)."""
        model = getattr(self.unwrap(module), attribute)
        if not self.is_sharded:
            return model if self.is_main else None
        full = self.whole_state_dict(module, attribute, saved)
        return plain_copy(model, full) if self.is_main else None

    def whole_state_dict(self, module, attribute: str, saved: Path | None = None) -> dict:
        """`module.<attribute>`'s whole state dict on rank 0 ({} or unused on the others); a
        collective under sharded backends (see `whole_model`)."""
        if not self.is_sharded:
            return getattr(self.unwrap(module), attribute).state_dict() if self.is_main else {}
        prefix = attribute + "."
        return {
            k[len(prefix) :]: v
            for k, v in self._full_state_dict(module, saved).items()
            if k.startswith(prefix)
        }

    def _full_state_dict(self, module: torch.nn.Module, saved) -> dict[str, torch.Tensor]:
        if self.backend == "deepspeed":
            full = _deepspeed_fp32_state_dict(saved / DEEPSPEED) if self.is_main else {}
            self.barrier()
            return full
        return self.accelerator.get_state_dict(module)

    @contextlib.contextmanager
    def gathered_head(self):
        """ZeRO-3: the parameters registered by `register_external` (the LM head) whole for the
        block, for code that multiplies by them outside a forward (evaluation's CE). Entered
        after the base model's forward: a tied embedding's own hooks would re-partition it."""
        if self.backend == "deepspeed" and self.zero_stage == 3 and self._external_params:
            from deepspeed.runtime.zero import GatheredParameters  # optional extra

            with GatheredParameters(self._external_params):
                yield
        else:
            yield

    @contextlib.contextmanager
    def gathered(self, module: torch.nn.Module):
        """FSDP2: `module`'s own (root) parameters unsharded for the block, so code may use a
        sub-module directly (e.g. `student.base_model` and `lm_head.weight` in evaluation)
        instead of the wrapper's forward. Decoder layers still gather themselves in their own
        forward. Every rank must enter it (FSDP2 all-gathers)."""
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

    def reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="max")

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def broadcast_object(self, obj, src: int = 0):
        """Rank `src`'s `obj` on every rank (e.g. a verdict only rank 0 computed)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def main_result(self, fn):
        """`fn()` computed on rank 0 only (e.g. hashing files once per launch), and its result
        on every rank; a DDKError it raises is raised on every rank (the others say which
        rank), so no rank is left waiting in a collective."""
        if self.world_size == 1:
            return fn()
        verdict, failure = None, None
        if self.is_main:
            try:
                verdict = ("ok", fn())
            except Exception as e:  # the others wait for the broadcast: tell them, then stop
                failure = e
                verdict = ("error", str(e) if isinstance(e, DDKError) else first_line(e))
        kind, value = self.broadcast_object(verdict)
        if failure is not None and not isinstance(failure, DDKError):
            raise failure
        if kind == "error":
            raise DDKError(value if self.is_main else f"rank 0: {value}")
        return value


class _StepGate:
    gradients_finite: bool | None = None  # None: the inner optimizer never ran (ZeRO skipped)


@contextlib.contextmanager
def _gated_inner_step(zero_optimizer, loss_finite: bool, runtime):
    """While ZeRO's step runs, its inner torch optimizer (the one that moves the fp32 master
    partitions) steps only if the loss is finite and the squared norm of every rank's
    gradient partitions, summed over ranks, is finite; otherwise the master weights, the Adam
    moments and the step count stay as they were, and ZeRO copies the unchanged weights back.
    Every rank calls the inner step equally often (once per parameter group or sub-group),
    so the reduction inside it is a matched collective."""
    gate = _StepGate()
    inners = [
        o
        for o in (
            getattr(zero_optimizer, "optimizer", None),
            getattr(zero_optimizer, "backup_optimizer", None),
        )
        if o is not None
    ]

    def gated(inner, real_step):
        def step(*args, **kwargs):
            squares = torch.zeros(1, dtype=torch.float32)
            for group in inner.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        squares += p.grad.detach().float().pow(2).sum().cpu()
            total = runtime.reduce_sum(squares.to(runtime.device))
            finite = math.isfinite(float(total[0]))
            gate.gradients_finite = finite and gate.gradients_finite is not False
            if loss_finite and gate.gradients_finite:
                return real_step(*args, **kwargs)
            return None

        return step

    own = [(inner, vars(inner).get("step")) for inner in inners]
    for inner in inners:
        inner.step = gated(inner, inner.step)
    try:
        yield gate
    finally:
        for inner, step in own:
            if step is None:
                del inner.step  # the class's own step again
            else:
                inner.step = step


def _bare(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper -> torch's


def _trainable_options(model: torch.nn.Module) -> StateDictOptions:
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=True, strict=not frozen)


def _trainable_state_dicts(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """The model and optimizer state dicts of the trainable parameters only (a LoRA
    student's adapters; every weight of a fully fine-tuned one): frozen weights are the base
    model's, read from its folder. A frozen weight tied to another (a tied LM head) is
    dropped too, which `ignore_frozen_params` alone misses."""
    model_sd, optim_sd = get_state_dict(model, _bare(optimizer), options=_trainable_options(model))
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model_sd.items() if k not in frozen}, optim_sd


def _load_dcp(folder: Path, model: torch.nn.Module, optimizer) -> None:
    model_sd, optim_sd = _trainable_state_dicts(model, optimizer)
    both = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(both, checkpoint_id=str(folder))
    except Exception as e:
        raise DDKError(f"cannot load sharded states from '{folder}': {first_line(e)}") from None
    set_state_dict(
        model,
        _bare(optimizer),
        model_state_dict=both["model"],
        optim_state_dict=both["optim"],
        options=_trainable_options(model),
    )


def _load_deepspeed(folder: Path, engine) -> None:
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


def _deepspeed_fp32_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 state dict, consolidated from a ZeRO-2/3 checkpoint's master weights."""
    from deepspeed.utils.zero_to_fp32 import (  # optional extra
        get_fp32_state_dict_from_zero_checkpoint,
    )

    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_TAG)


def _enable_cpu_fsdp(accelerator) -> None:
    """Accelerate turns on FSDP only for GPUs; with `ACCELERATE_USE_FSDP=true` on a CPU
    launch (gloo) ddk switches the same Accelerate FSDP2 path on, so the sharded code runs
    and is tested on CPUs. fully_shard itself supports CPU meshes."""
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
    `save_pretrained` and benchmark scoring: the sharded original's parameters are DTensors,
    which it cannot save."""
    with torch.device("meta"):  # the same class (remote-code models too), no memory yet
        copy = type(model)(model.config)
    copy.load_state_dict(state_dict, assign=True, strict=False)
    copy.tie_weights()
    # Buffers outside the state dict (rotary inv_freq) are whole on every rank: the copy runs.
    originals = dict(model.named_buffers())
    for name, buffer in list(copy.named_buffers()):
        if buffer.is_meta and name in originals:
            owner, _, attribute = name.rpartition(".")
            copy.get_submodule(owner)._buffers[attribute] = originals[name].detach().clone()
    missing = [n for n, p in copy.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"gathered state dict lacks {missing[:3]}")
    return copy
