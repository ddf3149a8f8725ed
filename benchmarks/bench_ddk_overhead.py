"""Steps/s of `kd` and `ddk` on the same tiny models and data: DDK's overhead is its periodic
per-domain student evaluation (the paper: +0.7 % compute over KD at K=1000).

    python benchmarks/bench_ddk_overhead.py [--steps 120] [--K 30] [--val-sequences 24]

KD runs with K = steps (it needs no interval evaluations: only the initial and final ones, which
DDK has too); DDK runs with the given K. Both include model setup-free loop time only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from ddk.config import PrepareSection, load_config
from ddk.data.prepare import prepare
from ddk.demo.build import tiny_causal_lm, train_bpe_tokenizer
from ddk.demo.corpus import build_demo_corpus
from ddk.metrics import read_metrics
from ddk.models import load_tokenizer
from ddk.table import format_table
from ddk.trainer import Trainer


def _save(path: Path, tok, **shape) -> Path:
    model = tiny_causal_lm(len(tok), **shape)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--K", type=int, default=30)
    parser.add_argument("--val-sequences", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ddk-bench-overhead-"))
    try:
        corpus = work / "corpus"
        build_demo_corpus(corpus, scale=0.3)
        texts = (
            json.loads(line)["text"] for f in sorted(corpus.glob("*/*.jsonl")) for line in f.open()
        )
        tok_dir = train_bpe_tokenizer(texts, 2048, work / "tok")
        tok = load_tokenizer(str(tok_dir))
        prepare(
            PrepareSection(
                input=str(corpus),
                output=str(work / "data"),
                seq_len=args.seq_len,
                val_sequences=args.val_sequences,
            ),
            str(tok_dir),
            progress=False,
        )
        teacher = _save(work / "teacher", tok, hidden_size=128, num_layers=4, num_heads=4)
        student = _save(work / "student", tok, hidden_size=64, num_layers=2, num_heads=2)

        rows, timings = [], {}
        for method, K in (("kd", args.steps), ("ddk", args.K)):
            run = work / f"run-{method}"
            cfg = load_config(
                None,
                [
                    f"model.teacher={teacher}",
                    f"model.student={student}",
                    f"data.prepared={work / 'data'}",
                    f"trainer.output_dir={run}",
                    f"trainer.max_steps={args.steps}",
                    f"distill.method={method}",
                    f"distill.K={K}",
                    f"trainer.micro_batch_size={args.batch}",
                    "trainer.warmup_steps=10",
                    "trainer.lr=1e-3",
                    "trainer.min_lr=1e-4",
                    f"trainer.save_every={args.steps}",
                ],
            )
            trainer = Trainer(cfg, run)
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
            evals = [
                r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "domain_update"
            ]
            eval_s = sum(r.get("eval_seconds", 0.0) for r in evals)
            timings[method] = seconds
            rows.append([method, K, len(evals), args.steps / seconds, seconds, eval_s])
        overhead = 100.0 * (timings["ddk"] / timings["kd"] - 1.0)
        print(
            f"{args.steps} steps x {args.batch} x {args.seq_len} tokens; "
            f"{args.val_sequences} validation sequences x 4 domains per evaluation"
        )
        print(format_table(["method", "K", "evaluations", "steps/s", "loop s", "eval s"], rows))
        print(
            f"DDK overhead over KD: {overhead:+.1f}% wall time "
            f"(expected ~ evaluations x eval cost; paper: +0.7% compute at K=1000)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
