"""Offline against online distillation through a teacher with ANOTHER tokenizer, on a demo
folder of `ddk demo --quick --cross-teacher`: ddk@x re-run online, and offline from a
`ddk cache-teacher` cache (format 3) at each k; test perplexity per byte per domain, cache
bytes/token and size, build and training time; and the bias of the cached loss: the divergence
of the student before training against each cache and against the live teacher, on the same
training rows (16 per domain), summed per alignment mode (exact rows: a lower bound; ULD rows:
the teacher's tail spread evenly).

    python benchmarks/cross_offline.py DEMO_OUT [--k 64 16] [--out /tmp/ddk-cross-offline]
        [--method ddk@x]

DEMO_OUT/configs/distill_<method>.yaml is the run (its teacher-x, student, data, steps, seed);
each variant writes its own run folder under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ddk.commands.cache_teacher import build_cache
from ddk.config import load_config
from ddk.data.dataset import PreparedData
from ddk.demo.crosstok import byte_perplexities, byte_table, mean_ppl
from ddk.logits import hidden_and_head
from ddk.losses.crosstok import cross_divergence
from ddk.losses.crosstok_sparse import SparseCrossRows, sparse_cross_divergence
from ddk.losses.divergences import get_divergence
from ddk.metrics import read_metrics
from ddk.run_dir import start_run
from ddk.table import format_table
from ddk.teacher.cache_format import read_cache_manifest
from ddk.teacher.crosstok import CrossTokenizerTeacher
from ddk.teacher.offline import OfflineTeacher
from ddk.teacher.signals import Batch


def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def _steps(run: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(run / "metrics.jsonl") if "kl" in r]


def _run(cfg) -> float:
    """Seconds `ddk distill` took (0: an earlier call of this script finished it)."""
    done = (Path(cfg.trainer.output_dir) / "final").exists()
    return 0.0 if done else _timed(start_run, cfg)


@torch.no_grad()
def bias_rows(cfg, caches: dict[int, Path], rows: int = 16) -> list[list[str]]:
    """Per alignment mode: the summed divergence of the student before training against the
    live teacher and against each cache, on the first `rows` training rows of each domain."""
    data = PreparedData(cfg.data.prepared)
    load = AutoModelForCausalLM.from_pretrained
    student, teacher_model = load(cfg.model.student).eval(), load(cfg.model.teacher).eval()
    tokenizers = (AutoTokenizer.from_pretrained(p) for p in (cfg.model.teacher, cfg.model.student))
    live = CrossTokenizerTeacher(teacher_model, *tokenizers, data)
    cached = {k: OfflineTeacher(c, data.names, torch.device("cpu")) for k, c in caches.items()}
    fn, tau = get_divergence(cfg.distill.divergence), cfg.distill.tau
    sums = {m: {"online": 0.0, **{k: 0.0 for k in caches}} for m in (1, 2)}
    for d, name in enumerate(data.names):
        inputs, _, _ = data.domains[name].train_batch(list(range(rows)))
        batch = Batch(inputs, [[d, j] for j in range(rows)])
        hidden, head = hidden_and_head(student, inputs)
        z_s = (hidden.reshape(-1, hidden.shape[-1]) @ head.weight.T)[:, : data.vocab_size]
        signal = live.signal(batch)
        z_t = (signal.hidden @ signal.head_weight.T)[:, : signal.teacher_vocab]
        per = {"online": cross_divergence(z_s, z_t, signal, fn, tau, cfg.distill.skew_lambda)}
        for k, teacher in cached.items():
            sig = teacher.signal(batch)
            per[k] = sparse_cross_divergence(z_s, SparseCrossRows(*sig.row_fields),
                                             sig.student_shared, sig.shared_index, fn, tau,
                                             cfg.distill.skew_lambda)  # fmt: skip
        for m in (1, 2):
            for key, values in per.items():
                sums[m][key] += float(values[signal.mode == m].sum())
    out = []
    for m, name in ((1, "exact rows (D)"), (2, "other rows (ULD)")):
        on = sums[m]["online"]
        out.append([name, f"{on:.2f}", *(f"{sums[m][k]:.2f} ({sums[m][k] / on - 1:+.2%})"
                                          for k in caches)])  # fmt: skip
    return out


def _variant(base: Path, out: Path, label: str, cache: Path | None, k: int) -> tuple:
    run = out / "runs" / label
    sets = [f"trainer.output_dir={run}", f"teacher.cache_k={k}"]
    if cache is not None:
        sets += [f"teacher.cache={cache}", "teacher.mode=offline"]
    cfg = load_config(base, sets)
    return run, cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path)
    parser.add_argument("--k", type=int, nargs="+", default=[64])
    parser.add_argument("--out", type=Path, default=Path("/tmp/ddk-cross-offline"))
    parser.add_argument("--method", default="ddk@x")
    args = parser.parse_args()
    base = args.demo / "configs" / f"distill_{args.method}.yaml"
    rows, runs = [], []
    run, cfg = _variant(base, args.out, "online", None, args.k[0])
    rows.append(["online", "-", "-", "-", f"{_run(cfg):.0f}"])
    runs.append(run)
    for k in args.k:
        cache = args.out / f"cache-k{k}"
        run, cfg = _variant(base, args.out, f"offline-k{k}", cache, k)
        built = _timed(build_cache, cfg, progress=False)
        m = read_cache_manifest(cache)
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20
        trained = _run(cfg)
        rows.append([f"offline k={k}", str(m["bytes_per_token"]), f"{size:.0f}", f"{built:.0f}",
                     f"{trained:.0f}"])  # fmt: skip
        runs.append(run)
    caches = {k: args.out / f"cache-k{k}" for k in args.k}
    bias = bias_rows(cfg, caches)
    models = {"student before": Path(cfg.model.student)}
    ppl = byte_perplexities(models, runs, Path(cfg.data.prepared), Path(cfg.model.teacher))
    (args.out / "results.json").write_text(json.dumps(ppl, indent=2))
    for row, run in zip(rows, runs):
        kl, speed = _steps(run, "kl"), _steps(run, "tokens_per_s")
        row += [f"{mean_ppl(ppl[run.name]):.4f}", f"{sum(kl) / len(kl):.4f}",
                f"{statistics.median(speed):.0f}"]  # fmt: skip
    head = ["run", "bytes/token", "cache MiB", "build s", "train s", "ppl/byte", "mean KL",
            "tok/s"]  # fmt: skip
    print(f"{args.method} through teacher-x ({args.demo}): test perplexity per byte\n")
    print(byte_table(ppl) + "\n")
    print(format_table(head, rows) + "\n")
    print("the student before training against the live teacher and each cache (summed "
          f"divergence, {cfg.distill.divergence}; gap to online):\n")  # fmt: skip
    print(format_table(["rows", "online", *(f"k={k}" for k in args.k)], bias))


if __name__ == "__main__":
    main()
