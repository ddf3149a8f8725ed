"""How ddk builds logits: from a model's last hidden state and its LM head, chunk by chunk
(`hidden_and_head`), plus the model's own scalar transform where its logits are not
`hidden @ W.T + b`, found by a load-time probe.

ddk's fused loss and evaluation never hold full [tokens, vocab] logits, so a model that transforms its logits after the head (Granite divides by
`logits_scaling`, Cohere multiplies by `logit_scale`, FalconH1 by `lm_head_multiplier`, Gemma 2
soft-caps with `final_logit_softcapping`, MiniCPM scales the hidden state) would be silently
wrong. Every model is probed once: its own `model(ids).logits` against the fused path on a few
tokens. A known scalar transform, read from the config, is applied and checked by the same
probe; anything else is refused with one line naming the model and the largest difference.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ddk.errors import DDKError

_ATTR = "_ddk_logit_transform"  # the probe's verdict, cached on the model object
PROBE_TOKENS = 8


@dataclass(frozen=True)
class LogitTransform:
    """z -> softcap · tanh(scale · z / softcap) (or scale · z without a cap)."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def _number(config, name: str) -> float | None:
    value = getattr(config, name, None)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def transform_from_config(config) -> LogitTransform | None:
    """The scalar transform a config declares (None: plain `hidden @ W.T + b`)."""
    scale = 1.0
    if (v := _number(config, "logits_scaling")) is not None:  # Granite: logits / s
        scale /= v
    for name in ("logit_scale", "lm_head_multiplier"):  # Cohere; FalconH1
        if (v := _number(config, name)) is not None:
            scale *= v
    base, hidden = _number(config, "dim_model_base"), _number(config, "hidden_size")
    if base is not None and hidden:  # MiniCPM: the hidden state is divided by hidden/base
        scale *= base / hidden
    softcap = None
    for name in ("final_logit_softcapping", "logits_soft_cap"):  # Gemma 2/3; RecurrentGemma
        if (v := _number(config, name)) is not None and v > 0:
            softcap = v
    t = LogitTransform(scale, softcap)
    return None if t.is_identity else t


def base_hidden(model, input_ids: torch.Tensor, position_ids=None) -> torch.Tensor:
    """The last hidden state, before the LM head. `position_ids` that restart inside a row
    (packed conversations) make Hugging Face models attend within each sequence only."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    return model.base_model(input_ids=input_ids, use_cache=False, **extra).last_hidden_state


def hidden_and_head(model, input_ids: torch.Tensor, position_ids=None):
    """Last hidden states and the LM head, so logits can be built chunk by chunk. Models whose
    logits are not `hidden @ W.T + b` need `logit_transform(model)` on top."""
    return base_hidden(model, input_ids, position_ids), model.get_output_embeddings()


def fused_logits(model, input_ids: torch.Tensor, transform: LogitTransform | None):
    """Logits the way ddk builds them: base model hidden state @ head (+ bias), transformed."""
    hidden = base_hidden(model, input_ids)
    head = model.get_output_embeddings()
    z = torch.nn.functional.linear(hidden, head.weight, getattr(head, "bias", None)).float()
    return z if transform is None else transform(z)


def _tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    # float32 matmuls agree to rounding; half precision models round their own logits.
    rel = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    return rel * max(1.0, float(reference.abs().max()))


@torch.no_grad()
def probe_logit_transform(model, name: str | None = None) -> LogitTransform | None:
    """Compare `model(ids).logits` with the fused path; the transform ddk must apply, or
    DDKError when the difference is not a known scalar transform."""
    label = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    head = model.get_output_embeddings()
    V = int(head.weight.shape[0])
    device = head.weight.device
    ids = (torch.arange(PROBE_TOKENS, device=device) * 7919 % max(V, 1)).unsqueeze(0)
    was_training = model.training
    model.eval()  # no dropout: both paths must see the same network
    try:
        reference = model(input_ids=ids, use_cache=False).logits.float()[..., :V]
        transform = transform_from_config(model.config)
        ours = fused_logits(model, ids, transform)
    finally:
        model.train(was_training)
    # A model with NaN weights gives NaN on both paths: that is an evaluation problem (a
    # baseline logs it), not a logit transform. NaN on one path only fails the check.
    both_nan = reference.isnan() & ours.isnan()
    diff = float((reference - ours).abs().masked_fill(both_nan, 0.0).max())
    finite = reference.masked_fill(~reference.isfinite(), 0.0)
    if not diff <= _tolerance(head.weight.dtype, finite):  # NaN fails too
        plain = f", declared transform {transform}" if transform is not None else ""
        raise DDKError(
            f"model '{label}' ({type(model).__name__}) computes logits ddk cannot rebuild from "
            f"hidden @ W.T + b (max difference {diff:.3g} on {PROBE_TOKENS} tokens{plain}); "
            "ddk supports plain heads, scalar logit scales and final-logit softcapping"
        )
    return transform


def logit_transform(model, name: str | None = None) -> LogitTransform | None:
    """The probe's verdict for `model`, probed once and remembered on the model object."""
    if _ATTR not in model.__dict__:
        model.__dict__[_ATTR] = probe_logit_transform(model, name)
    return model.__dict__[_ATTR]


def remember_logit_transform(model, transform: LogitTransform | None) -> None:
    """A verdict probed on another copy of the same model (rank 0's whole teacher), for a
    copy that cannot run the probe itself (a sharded one, before its first collective)."""
    model.__dict__[_ATTR] = transform
