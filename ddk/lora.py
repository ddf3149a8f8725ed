"""LoRA students (`model.lora`) through peft: adapters are injected into the student in place
(it stays the Hugging Face model every other module expects; its frozen `base_layer` weights
sit beside the trainable `lora_A`/`lora_B`), and only the adapters reach the optimizer and
the checkpoints.

    preflight:   `lora_problems`: peft installed, target_modules against a meta-device skeleton
    trainer:     `apply_lora` (refuses DeepSpeed), `trainable_weights` for checkpoints
    final:       `merged_state_dict` (W + alpha/r * B @ A, a pure function of the whole state
                 dict, so FSDP2's gathered dict works as DDP's does) and `save_adapter`
                 (peft's on-disk format: `PeftModel.from_pretrained(base, final/adapter)`)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from ddk.config import LoraSection
from ddk.errors import DDKError
from ddk.models import whole_weights

ADAPTER = "default"  # peft's name for the one adapter ddk trains
ALL_LINEAR = "all-linear"
_LORA_KEY = re.compile(rf"^(?P<layer>.+)\.lora_(?P<ab>[AB])\.{ADAPTER}\.weight$")
_PEFT_PREFIX = "base_model.model."  # the key prefix PeftModel.save_pretrained writes


def _peft():
    try:
        import peft  # optional extra
    except ImportError:
        raise DDKError(
            "model.lora needs peft: pip install 'ddk-distill[peft]' (or set model.lora: null "
            "for full fine-tuning)"
        ) from None
    return peft


def lora_config(lora: LoraSection):
    """The peft LoraConfig of a `model.lora` section."""
    return _peft().LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
    )


# ------------------------------------------------------------------ which layers
def candidates(model: torch.nn.Module) -> list[str]:
    """The names (last component) of the linear layers an adapter may target: every
    torch.nn.Linear but the LM head, whose weight ddk's fused loss multiplies by directly
    (an adapter there would be trained by nothing and merged into nothing)."""
    head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of names


def target_problems(lora: LoraSection, model: torch.nn.Module) -> list[str]:
    """Each target module the student lacks (or that is its LM head), with the candidates."""
    if not candidates(model):
        return [
            f"model.lora: the student ({type(model).__name__}) has no torch.nn.Linear layers "
            "besides its LM head; ddk's LoRA adapts Linear layers only (GPT-2's Conv1D is not)"
        ]
    if lora.target_modules == ALL_LINEAR:
        return []
    head = model.get_output_embeddings()
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    heads = {n for n, m in model.named_modules() if m is head}
    missing = [
        t
        for t in lora.target_modules
        if not any(_matches(n, t) for n in names - heads) or any(_matches(n, t) for n in heads)
    ]
    if not missing:
        return []
    return [
        f"model.lora.target_modules: {', '.join(missing)} not among the student's linear layers "
        f"(the LM head excluded); candidates: {', '.join(candidates(model))}"
    ]


def lora_problems(lora: LoraSection, model_config, trust_remote_code: bool) -> list[str]:
    """What preflight reports before any weight loads: peft missing, or target modules the
    student lacks (checked on its module tree built on the meta device: no memory)."""
    try:
        _peft()
    except DDKError as e:
        return [f"model.lora: {e}"]
    # whole_weights: under a ZeRO-3 launch transformers would partition (and initialise) it.
    with whole_weights(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    return target_problems(lora, model)


# ------------------------------------------------------------------ training
def check_backend(backend: str) -> None:
    if backend == "deepspeed":
        raise DDKError(
            "model.lora is not supported under DeepSpeed ZeRO (its partitioned frozen base "
            "weights are not handled by ddk's checkpoints and final merge); launch with DDP "
            "or FSDP2 (examples/accelerate/)"
        )


def apply_lora(student: torch.nn.Module, lora: LoraSection | None, backend: str):
    """Inject the adapters into `student` in place and freeze everything else (lora None:
    the student as it is, every weight trained)."""
    if lora is None:
        return student
    check_backend(backend)
    problems = target_problems(lora, student)
    if problems:
        raise DDKError(problems[0])
    _peft().inject_adapter_in_model(lora_config(lora), student, adapter_name=ADAPTER)
    other = {
        type(m.base_layer).__name__
        for m in student.modules()
        if isinstance(getattr(m, "base_layer", None), torch.nn.Module)
        and not isinstance(m.base_layer, torch.nn.Linear)
    }
    if other:  # e.g. GPT-2's Conv1D under all-linear: merged as W + s·B@A it would be wrong
        raise DDKError(
            f"model.lora: adapters landed on {', '.join(sorted(other))} layers; ddk merges "
            "LoRA into torch.nn.Linear layers only: list target_modules by name (candidates: "
            f"{', '.join(candidates(student))})"
        )
    for name, p in student.named_parameters():
        p.requires_grad_(_LORA_KEY.match(name) is not None)
    return student


class TrainableWeights(torch.nn.Module):
    """The student's trainable parameters (the same Parameter objects) as one module, so a
    checkpoint writes and reads only these: `model.safetensors` of a LoRA run holds its
    adapters, keyed by their names with '.' written as '/'."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.weights = torch.nn.ParameterDict(
            {n.replace(".", "/"): p for n, p in model.named_parameters() if p.requires_grad}
        )


def trainable_weights(model: torch.nn.Module, lora: LoraSection | None) -> torch.nn.Module:
    """What a whole-state checkpoint saves: the adapters of a LoRA run, else the student."""
    return TrainableWeights(model) if lora is not None else model


# ------------------------------------------------------------------ final/
def merged_state_dict(
    state_dict: dict[str, torch.Tensor], lora: LoraSection
) -> dict[str, torch.Tensor]:
    """A plain model's state dict: each adapted layer's `base_layer.weight` plus
    (alpha / r) · B @ A under the layer's own name, the adapters dropped."""
    scaling = lora.alpha / lora.r
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if m := _LORA_KEY.match(key):
            pairs.setdefault(m["layer"], {})[m["ab"]] = value
    merged = {}
    for key, value in state_dict.items():
        if _LORA_KEY.match(key):
            continue
        layer, _, rest = key.partition(".base_layer.")
        if rest and layer in pairs:
            if rest == "weight":
                a, b = pairs[layer]["A"], pairs[layer]["B"]
                value = value + scaling * (b.to(value.dtype) @ a.to(value.dtype))
            key = f"{layer}.{rest}"
        merged[key] = value
    return merged


def adapter_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters in peft's file format (`base_model.model.<layer>.lora_A.weight`)."""
    return {
        f"{_PEFT_PREFIX}{m['layer']}.lora_{m['ab']}.weight": v.detach().contiguous()
        for key, v in state_dict.items()
        if (m := _LORA_KEY.match(key))
    }


def save_adapter(
    folder: Path, state_dict: dict[str, torch.Tensor], lora: LoraSection, base: str
) -> None:
    """`folder` as `PeftModel.save_pretrained` writes it: adapter_config.json (base model
    named) and adapter_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    config = lora_config(lora)
    config.base_model_name_or_path = base
    config.save_pretrained(str(folder))
    save_file(
        adapter_state_dict(state_dict),
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
