"""How much one domain's training gradient helps the others: per-domain gradients of the
student's cross-entropy on each domain's validation windows, their norms and pairwise cosines,
and the first-order alignment scores a DoGE-style reweighting would sample by.

    python benchmarks/domain_gradients.py --data /tmp/base/prepared --model /tmp/base/student/final \
        [--run RUN_FOLDER [--update N]]

With --run, the emphasis c is that run's N-th domain update (default: the last) as `preset:
robust` weighs the gaps: c ∝ exp(log(ratio) / 2). The score of domain j is
a_j = <g_j, u> / <u, u> with u = Σ_i c_i g_i: how much a step on j's data lowers the
c-weighted loss, relative to a step on the c-weighted mix itself (1 = as much). Cosines near 0
mean a step on one domain barely moves the others, so a_j is about c_j |g_j|² / <u, u>: the
gradient norm, not transfer, decides. Without --run, c is uniform.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ddk.data.dataset import PreparedData
from ddk.errors import DDKError
from ddk.losses import IGNORE_INDEX
from ddk.metrics import DOMAIN_UPDATE, read_metrics
from ddk.models import eval_model
from ddk.table import format_table


def domain_gradients(model, data: PreparedData, split: str = "val") -> torch.Tensor:
    """[domains, parameters]: the gradient of each domain's mean token cross-entropy."""
    rows = []
    for name in data.names:
        shard = data.domains[name]
        inputs, labels = shard.heldout_batch(split, range(shard.num_sequences(split)))
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )
        loss.backward()
        rows.append(
            torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        )
    return torch.stack(rows)


def alignment_scores(gram: np.ndarray, emphasis: np.ndarray) -> np.ndarray:
    """a_j = <g_j, u> / <u, u>, u = Σ_i c_i g_i, from the Gram matrix <g_i, g_j>."""
    return gram @ emphasis / float(emphasis @ gram @ emphasis)


def emphasis_of(run: Path, domains: list[str], update: int) -> np.ndarray:
    """c ∝ exp(log(ratio) / 2) from the run's `update`-th domain update (as `robust`)."""
    updates = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == DOMAIN_UPDATE]
    if not updates:
        raise DDKError(f"'{run}' has no domain updates in metrics.jsonl; give a DDK run")
    try:
        ratios = np.array([float(updates[update]["domains"][d]["ratio"]) for d in domains])
    except IndexError:
        raise DDKError(f"'{run}' has {len(updates)} domain updates; --update {update}") from None
    except (KeyError, TypeError):
        raise DDKError(f"'{run}' has no teacher ratio for every domain of the data") from None
    c = np.exp(np.log(ratios) / 2.0)
    return c / c.sum()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="prepared data folder")
    p.add_argument("--model", required=True, help="model folder (the student)")
    p.add_argument("--run", help="run folder whose domain update gives the emphasis")
    p.add_argument("--update", type=int, default=-1, help="which domain update (default: last)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = PreparedData(args.data)
    domains = data.names
    model = eval_model(args.model, device="cpu")
    grads = domain_gradients(model, data)
    gram = (grads @ grads.T).double().numpy()
    norms = np.sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):  # a zero gradient: no direction
        cosine = gram / np.outer(norms, norms)
    c = (
        emphasis_of(Path(args.run), domains, args.update)
        if args.run
        else np.full(len(domains), 1 / len(domains))
    )
    scores = alignment_scores(gram, c)
    rows = [
        [d, f"{c[i]:.3f}", f"{norms[i]:.3f}", f"{scores[i]:.3f}",
         *(f"{cosine[i, j]:+.2f}" for j in range(len(domains)))]
        for i, d in enumerate(domains)
    ]  # fmt: skip
    print(format_table(["domain", "emphasis c", "|grad|", "score a", *domains], rows))
    off = cosine[~np.eye(len(domains), dtype=bool)]
    print(f"\ncosines between domains: {off.min():+.2f} … {off.max():+.2f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DDKError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
