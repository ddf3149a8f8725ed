"""Per-domain held-out perplexity: exp(mean next-token cross-entropy over the domain's
validation or test windows; each window is one document's, so no target is predicted across a
document boundary). DDK steers by the validation split (Eq. 1/Eq. 2); final numbers
(`final_eval`, `ddk eval`, the demo table, `ddk report`) come from the test split, which nothing
was tuned on."""

from __future__ import annotations

import contextlib
import json
import math
import sys

import numpy as np
import torch

from ddk.data.dataset import PreparedData
from ddk.errors import DDKError
from ddk.logits import logit_transform
from ddk.losses import chunked_ce_sum
from ddk.models import hidden_and_head
from ddk.table import format_table


def report_split(data: PreparedData, wanted: str = "test") -> str:
    """`wanted` when the data has it; data prepared without a test split falls back to val,
    with one warning, so old folders still evaluate."""
    if wanted == "val" or data.has_split(wanted):
        return wanted
    print(
        f"warning: '{data.folder}' has no {wanted} split (prepared before test splits); "
        "reporting the validation split, which DDK steered by. Prepare the data again for a "
        "held-out test split",
        file=sys.stderr,  # stdout may be `ddk eval --json`
    )
    return "val"


def _world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def domain_perplexities(
    model,
    data: PreparedData,
    *,
    vocab_size: int,
    split: str = "val",
    batch_size: int = 8,
    max_sequences: int | None = None,
    autocast=contextlib.nullcontext,
    chunk_tokens: int = 1024,
    gather_head=contextlib.nullcontext,
) -> dict[str, dict[str, float]]:
    """{domain: {"ppl", "loss", "tokens"}} on `split`; ranks split the sequences and sum.
    `gather_head`: a context in which a partitioned LM head (ZeRO-3) is whole, entered by
    every rank for every batch (a collective)."""
    was_training = model.training
    model.eval()
    # The head is whole and on the compute device under every placement (sharded or not).
    device = model.get_output_embeddings().weight.device
    rank, world = _world()
    transform = logit_transform(model)
    sums = torch.zeros(len(data.domains), 2, dtype=torch.float64, device=device)
    for d, shard in enumerate(data.domains.values()):
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
            with autocast():
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
    if world > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    out = {}
    for d, name in enumerate(data.domains):
        loss = (sums[d, 0] / sums[d, 1].clamp_min(1)).item()
        out[name] = {"ppl": math.exp(min(loss, 700.0)), "loss": loss, "tokens": int(sums[d, 1])}
    return out


def run_perplexities(
    cfg, model, data: PreparedData, split: str, autocast, gather_head=contextlib.nullcontext
) -> dict:
    """`domain_perplexities` with a run config's evaluation settings (batch size, loss chunk)."""
    return domain_perplexities(
        model,
        data,
        vocab_size=data.vocab_size,
        split=split,
        batch_size=cfg.trainer.eval_batch_size,
        autocast=autocast,
        chunk_tokens=cfg.distill.loss_chunk_tokens,
        gather_head=gather_head,
    )


def evaluate_model_cli(
    model_name: str,
    data_dir: str,
    *,
    domains: list[str] | None,
    batch_size: int,
    max_sequences: int | None,
    as_json: bool,
    split: str = "test",
) -> dict:
    from ddk.data.vocab import same_vocabulary
    from ddk.models import check_vocab, embedding_rows, load_model, load_tokenizer, resolve_dtype

    if domains is not None and not domains:
        raise DDKError("--domains needs at least one domain name")
    data = PreparedData(data_dir, domains)
    try:
        tokenizer = load_tokenizer(model_name)
    except DDKError:
        tokenizer = None  # a model folder without tokenizer files: rely on the size check
    if tokenizer is not None and not same_vocabulary(data.manifest, tokenizer):
        raise DDKError(
            f"'{data_dir}' was tokenised with '{data.manifest.tokenizer.name_or_path}', whose "
            f"vocabulary differs from the tokenizer of '{model_name}'; prepare it with the model's"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_name, dtype=resolve_dtype("auto", device), what="model").to(device)
    check_vocab(data.vocab_size, None, embedding_rows(model))
    split = report_split(data, split)
    result = domain_perplexities(
        model,
        data,
        vocab_size=data.vocab_size,
        split=split,
        batch_size=batch_size,
        max_sequences=max_sequences,
    )
    if as_json:
        payload = {"model": model_name, "data": str(data_dir), "split": split, "domains": result}
        print(json.dumps(payload, indent=2))
    else:
        rows = [[name, r["ppl"], r["loss"], r["tokens"]] for name, r in result.items()]
        ppls = [r["ppl"] for r in result.values()]
        geo = math.exp(sum(math.log(p) for p in ppls) / len(ppls))
        rows.append(
            ["geometric mean", geo, math.log(geo), sum(r["tokens"] for r in result.values())]
        )
        print(f"{split} split perplexity per domain")
        print(format_table(["domain", "perplexity", "loss (nats)", "tokens"], rows))
    return result
