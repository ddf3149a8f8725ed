"""DDK's loss (Eq. 3): per-token divergences and the chunked LM-head + CE + γ·divergence sum."""

from ddk.losses.chunked import (
    IGNORE_INDEX,
    FusedDistillLoss,
    LossSums,
    chunked_ce_sum,
    fused_distill_loss,
    loss_from_config,
    naive_distill_loss,
)
from ddk.losses.divergences import (
    DIVERGENCES,
    NO_DIVERGENCE,
    DivergenceFn,
    forward_kl,
    get_divergence,
    js,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
)

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "NO_DIVERGENCE",
    "DivergenceFn",
    "FusedDistillLoss",
    "LossSums",
    "chunked_ce_sum",
    "forward_kl",
    "fused_distill_loss",
    "get_divergence",
    "js",
    "loss_from_config",
    "naive_distill_loss",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
]
