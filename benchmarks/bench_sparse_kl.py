"""Bias and variance of the offline (sparse) divergence against the dense one, on real models.

    ddk demo --quick --out /tmp/demo                          # once: tiny teacher/student, data
    python benchmarks/bench_sparse_kl.py --demo /tmp/demo
    python benchmarks/bench_sparse_kl.py --demo /tmp/demo --student /tmp/demo/runs/ddk/final
    python benchmarks/bench_sparse_kl.py --demo /tmp/demo --controls     # the control ablation

The teacher and student are the demo's (`OUT/configs/distill_ddk.yaml` names them; the
student before distillation unless --student says otherwise), the tokens the first
--sequences validation windows of every domain of `OUT/prepared` (real text, the positions that
score a target of the window's own document). For each
divergence and tau, the dense divergence D and its gradient g w.r.t. the student's parameters
(summed over the batch's tokens, float64) are compared with what an offline run trains on,
the teacher signal rounded as `ddk cache-teacher` stores it (float16 log-probs):

- topk k=K: the top-k buckets (today's cache, and at equal bytes to the sampled one);
- sampled k=K m=M: the top-k head plus M sampled tail tokens (drawn by ddk.teacher.sampling,
  read by ddk.losses.sparse), over --draws independent draws (the cache's per-token uniforms
  under different keys).

Columns: bytes/token of the cache; value bias = mean over draws / D - 1; value sd = the
standard deviation of one draw / D; grad cos (1 draw) = mean over draws of cos(g_hat, g);
grad cos (mean) = cos(mean of g_hat over the draws, g): 1 for an unbiased estimator as the
draws grow, the same as one draw for a biased deterministic one.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ddk.config import load_config
from ddk.data.dataset import PreparedData
from ddk.losses import DIVERGENCES, IGNORE_INDEX
from ddk.losses.divergences import DIVERGENCE_TERMS
from ddk.losses.sparse import TANGENT_CONTROL, sampled_divergence, sparse_divergence
from ddk.table import format_table
from ddk.teacher.cache_format import LOGP_DTYPE, bytes_per_token
from ddk.teacher.sampling import PROPOSAL_POWER, counter_uniforms, sampled_from_logits
from ddk.teacher.signals import sparse_from_logits

LOGP_TORCH = getattr(torch, LOGP_DTYPE.name)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, type=Path, help="a `ddk demo` output folder")
    p.add_argument("--student", help="student folder (default: the demo's, before distillation)")
    p.add_argument("--sequences", type=int, default=4, help="validation sequences per domain")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--m", type=int, default=32, help="sampled tail tokens per position")
    p.add_argument("--power", type=float, default=PROPOSAL_POWER, help="tail proposal ∝ p^power")
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--taus", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--divergences", nargs="+", default=sorted(DIVERGENCES))
    p.add_argument("--skew-lambda", type=float, default=0.1)
    p.add_argument("--controls", action="store_true", help="also each sampled row's other control")
    p.add_argument(
        "--exact-logp",
        action="store_true",
        help="keep the teacher's log-probs unrounded (isolates sampling from float16 storage)",
    )
    p.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    return p.parse_args()


def _windows(demo: Path, sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, T], mask [B * T] of the positions that score a real target): the first
    `sequences` validation windows of every domain, each within one document (padded)."""
    data = PreparedData(str(demo / "prepared"), None)
    batches = [data.domains[n].heldout_batch("val", range(sequences)) for n in data.domains]
    width = max(inputs.shape[1] for inputs, _ in batches)
    inputs = torch.cat([F.pad(x, (0, width - x.shape[1])) for x, _ in batches])
    labels = torch.cat([F.pad(y, (0, width - y.shape[1]), value=IGNORE_INDEX) for _, y in batches])
    return inputs, (labels != IGNORE_INDEX).reshape(-1)


def _topk(logits: torch.Tensor, k: int, tau: float, rounded: bool):
    s = sparse_from_logits(logits, k, tau)
    if not rounded:
        return s
    return s._replace(logp=s.logp.to(LOGP_TORCH).to(s.logp.dtype))  # as the cache stores it


def main() -> None:
    args = _parse()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cfg = load_config(args.demo / "configs" / "distill_ddk.yaml")
    teacher = AutoModelForCausalLM.from_pretrained(cfg.model.teacher).eval()
    student = AutoModelForCausalLM.from_pretrained(args.student or cfg.model.student).double()
    seqs, real = _windows(args.demo, args.sequences)
    vocab = teacher.config.vocab_size
    with torch.no_grad():
        z_t = teacher(seqs).logits.reshape(-1, vocab)[real].float()
    params = [p for p in student.parameters() if p.requires_grad]
    z_s = student(seqs).logits.reshape(-1, vocab)[real]
    n = z_s.shape[0]

    def grad(value: torch.Tensor) -> torch.Tensor:
        g = torch.autograd.grad(value, params, retain_graph=True)
        return torch.cat([x.flatten() for x in g])

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    k, m = args.k, args.m
    started = time.time()
    rows = []
    for tau in args.taus:
        signals = [
            sampled_from_logits(
                z_t, k, m, tau, torch.from_numpy(counter_uniforms(seed, np.arange(n))),
                power=args.power, logp_dtype=None if args.exact_logp else LOGP_TORCH,
            )[0]
            for seed in range(args.draws)
        ]  # fmt: skip
        for name in args.divergences:
            dense = DIVERGENCES[name](z_s, z_t, tau, args.skew_lambda).sum()
            g_dense = grad(dense)
            dense = float(dense.detach())
            for kk in (k, k + m):
                est = sparse_divergence(
                    z_s, _topk(z_t, kk, tau, not args.exact_logp), tau, name, args.skew_lambda
                ).sum()
                g = grad(est)
                rows.append([name, f"{tau:g}", f"topk k={kk}", bytes_per_token(kk, vocab),
                             100 * float(est.detach() / dense - 1), 0.0, cos(g, g_dense),
                             cos(g, g_dense)])  # fmt: skip
            controls = [name in TANGENT_CONTROL]
            if args.controls:
                controls.append(not controls[0])
            for control in controls:
                values, cosines, g_sum = [], [], torch.zeros_like(g_dense)
                for signal in signals:
                    est = sampled_divergence(
                        z_s, signal, tau, DIVERGENCE_TERMS[name], args.skew_lambda, control
                    ).sum()
                    g = grad(est)
                    values.append(float(est.detach()))
                    cosines.append(cos(g, g_dense))
                    g_sum += g
                v = np.array(values) / dense
                label = f"sampled k={k} m={m}" + (
                    "" if len(controls) == 1 else (", tangent" if control else ", no control")
                )
                rows.append([name, f"{tau:g}", label, bytes_per_token(k, vocab, m),
                             100 * (v.mean() - 1), 100 * v.std(ddof=1), float(np.mean(cosines)),
                             cos(g_sum, g_dense)])  # fmt: skip
            print(f"  {name} tau={tau} done ({time.time() - started:.0f}s)", flush=True)

    headers = ["divergence", "tau", "estimator", "bytes/token", "value bias %", "value sd %",
               "grad cos (1 draw)", f"grad cos (mean of {args.draws})"]  # fmt: skip
    info = (
        f"# command: python {' '.join(sys.argv)}\n"
        f"# bench_sparse_kl: {platform.machine()}, torch {torch.__version__}; "
        f"{n} tokens ({args.sequences} val sequences x {len(seqs) // args.sequences} domains), "
        f"vocab {vocab}, student {args.student or cfg.model.student}, tail proposal p^{args.power}, "
        f"{args.draws} draws{', unrounded log-probs' if args.exact_logp else ''}; "
        f"{time.time() - started:.0f}s"
    )
    print("\n" + info + "\n" + format_table(headers, rows))
    if args.out:
        args.out.write_text(info + "\n\n" + format_table(headers, rows, markdown=True) + "\n")


if __name__ == "__main__":
    main()
