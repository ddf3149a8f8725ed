"""Per-domain held-out perplexity: exp(mean next-token cross-entropy over the domain's
validation or test windows; each window is one document's, so no target is predicted across a
document boundary). DDK steers by the validation split (Eq. 1/Eq. 2); final numbers
(`final_eval`, `ddk eval`, the demo table, `ddk report`) come from the test split, which nothing
was tuned on."""

from __future__ import annotations

import contextlib
import math
import sys

import numpy as np
import torch

from ddk.data.dataset import PreparedData
from ddk.logits import hidden_and_head, logit_transform
from ddk.losses import chunked_ce_sum
from ddk.ranks import print0
from ddk.runtime import LocalRuntime


def report_split(data: PreparedData, wanted: str = "test") -> str:
    """`wanted` when the data has it; data prepared without a test split falls back to val,
    with one warning, so old folders still evaluate."""
    if wanted == "val" or data.has_split(wanted):
        return wanted
    print0(
        f"warning: '{data.folder}' has no {wanted} split (prepared before test splits); "
        "reporting the validation split, which DDK steered by. Prepare the data again for a "
        "held-out test split",
        file=sys.stderr,  # stdout may be `ddk eval --json`
    )
    return "val"


@torch.no_grad()
def domain_perplexities(
    model,
    data: PreparedData,
    *,
    vocab_size: int,
    split: str = "val",
    batch_size: int = 8,
    max_sequences: int | None = None,
    chunk_tokens: int = 1024,
    runtime=None,
    gather_head=contextlib.nullcontext,
    domains=None,
) -> dict[str, dict[str, float]]:
    """{domain: {"ppl", "loss", "tokens"}} on `split` over `domains` (default: all), the
    `runtime`'s ranks (default: this process alone) splitting the sequences. `gather_head`: a
    context in which a partitioned (ZeRO-3) LM head is whole, entered by every rank per batch."""
    was_training = model.training
    model.eval()
    # The head is whole and on the compute device under every placement (sharded or not).
    device = model.get_output_embeddings().weight.device
    runtime = runtime if runtime is not None else LocalRuntime(device)
    rank, world = runtime.rank, runtime.world_size
    transform = logit_transform(model)
    names = [n for n in data.domains if domains is None or n in domains]
    sums = torch.zeros(len(names), 3, dtype=torch.float64, device=device)
    for d, shard in enumerate(data.domains[n] for n in names):
        available = shard.num_sequences(split)
        n = available if max_sequences is None else min(max_sequences, available)
        # Windows hold one document each, so their lengths differ: batch them longest first,
        # each batch padded to its longest (the sum does not depend on the order).
        by_length = np.argsort(-shard.window_lengths(split)[:n], kind="stable")
        mine = by_length[rank::world].tolist()
        # Every rank runs the same number of forwards: with sharded weights (FSDP2, ZeRO-3)
        # each forward is a collective, so a rank with one batch fewer scores a throwaway one.
        for start in range(0, math.ceil(n / world), batch_size):
            rows = mine[start : start + batch_size]
            inputs, labels = shard.heldout_batch(split, rows or [0])
            with runtime.autocast():
                hidden, head = hidden_and_head(model, inputs.to(device))
            with gather_head():
                if not rows:
                    continue
                loss_sum, tokens = chunked_ce_sum(
                    hidden.reshape(-1, hidden.shape[-1]),
                    head.weight,
                    labels.to(device).reshape(-1),
                    vocab_size=vocab_size,
                    chunk_tokens=chunk_tokens,
                    head_bias=getattr(head, "bias", None),
                    transform=transform,
                )
            sums[d, 0] += float(loss_sum)
            sums[d, 1] += float(tokens)
            sums[d, 2] += target_bytes(shard, split, rows) if data.has_byte_spans else 0
    sums = runtime.reduce_sum(sums)
    model.train(was_training)
    return {name: _result(sums[d], data.has_byte_spans) for d, name in enumerate(names)}


def _result(sums: torch.Tensor, per_byte: bool) -> dict:
    """{"ppl", "loss", "tokens"} of one domain's (NLL, targets, bytes) sums; with byte spans
    also "bytes" and "ppl_byte", the same total NLL per UTF-8 byte (comparable across
    tokenizers)."""
    loss = (sums[0] / sums[1].clamp_min(1)).item()
    out = {"ppl": math.exp(min(loss, 700.0)), "loss": loss, "tokens": int(sums[1])}
    if per_byte:
        out["bytes"] = int(sums[2])
        out["ppl_byte"] = math.exp(min(float(sums[0]) / max(int(sums[2]), 1), 700.0))
    return out


def target_bytes(shard, split: str, rows) -> int:
    """UTF-8 bytes of the targets of held-out windows `rows` (`ddk.data.offsets`)."""
    spans = shard.byte_spans(split)
    return sum(spans.target_bytes(*shard.window_start(split, r)) for r in rows)


def run_perplexities(
    cfg,
    model,
    data: PreparedData,
    split: str,
    runtime,
    gather_head=contextlib.nullcontext,
    domains=None,
) -> dict:
    """`domain_perplexities` with a run config's evaluation settings (batch size, loss chunk)."""
    return domain_perplexities(
        model,
        data,
        vocab_size=data.vocab_size,
        split=split,
        batch_size=cfg.trainer.eval_batch_size,
        chunk_tokens=cfg.distill.loss_chunk_tokens,
        runtime=runtime,
        gather_head=gather_head,
        domains=domains,
    )
