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

import torch

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
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--teacher", default="128x4", help="hidden x layers")
    parser.add_argument("--student", default="64x2", help="hidden x layers")
    parser.add_argument("--scale", type=float, default=0.3, help="demo corpus size")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per method, alternating; best kept"
    )
    args = parser.parse_args()

    def shape(spec: str) -> dict:
        hidden, layers = (int(x) for x in spec.split("x"))
        return {
            "hidden_size": hidden,
            "num_layers": layers,
            "num_heads": max(1, hidden // 64),
            "max_positions": args.seq_len,
        }

    work = Path(tempfile.mkdtemp(prefix="ddk-bench-overhead-"))
    try:
        corpus = work / "corpus"
        build_demo_corpus(corpus, scale=args.scale)
        texts = (
            json.loads(line)["text"] for f in sorted(corpus.glob("*/*.jsonl")) for line in f.open()
        )
        tok_dir = train_bpe_tokenizer(texts, args.vocab, work / "tok")
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
        teacher = _save(work / "teacher", tok, **shape(args.teacher))
        student = _save(work / "student", tok, **shape(args.student))
        sizes = {
            name: sum(p.numel() for p in tiny_causal_lm(len(tok), **shape(spec)).parameters())
            for name, spec in (("teacher", args.teacher), ("student", args.student))
        }

        rows, timings = {}, {}
        for repeat, (method, K) in enumerate([("kd", args.steps), ("ddk", args.K)] * args.repeats):
            run = work / f"run-{method}-{repeat}"
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
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
            peak = (
                torch.cuda.max_memory_allocated() / 2**30
                if torch.cuda.is_available()
                else float("nan")
            )
            evals = [
                r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "domain_update"
            ]
            eval_s = sum(r.get("eval_seconds", 0.0) for r in evals)
            del trainer
            if seconds >= timings.get(method, float("inf")):
                continue
            timings[method] = seconds
            tok_s = args.steps * args.batch * args.seq_len / seconds
            rows[method] = [
                method,
                K,
                len(evals),
                args.steps / seconds,
                tok_s,
                seconds,
                eval_s,
                peak,
            ]
        overhead = 100.0 * (timings["ddk"] / timings["kd"] - 1.0)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        print(
            f"{device}; teacher {sizes['teacher'] / 1e6:.1f}M, student {sizes['student'] / 1e6:.1f}M "
            f"parameters, vocab {len(tok)}; {args.steps} steps x {args.batch} x {args.seq_len} "
            f"tokens; {args.val_sequences} validation sequences x 4 domains per evaluation"
        )
        headers = [
            "method",
            "K",
            "evaluations",
            "steps/s",
            "tokens/s",
            "loop s",
            "eval s",
            "peak GiB",
        ]
        print(format_table(headers, list(rows.values())))
        print(
            f"DDK overhead over KD: {overhead:+.1f}% wall time "
            f"(expected ~ evaluations x eval cost; paper: +0.7% compute at K=1000)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
