"""Distillation through a teacher with ANOTHER tokenizer against `cpt`, over seeds: mean test
perplexity per byte (mean over domains), per model, as mean ± spread (half the max-min range).

    python benchmarks/cross_seeds.py [--seeds 0 1 2] [--out /tmp/ddk-cross]
        [--methods cpt kd ddk] [--cross-methods kd ddk kd:skip kd:merge]

('kd:skip' / 'kd:merge': kd with distill.cross_mismatch=skip / merge; plain 'kd' uses uld.)

Each seed is exactly `ddk demo --quick --seed S --cross-teacher --no-benchmarks ...` (its own
corpus, tokenizers, teachers and student, cached under --out); the numbers are read from each
seed's cross_results.json (the test split).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ddk.cli import build_parser
from ddk.demo.crosstok import mean_ppl
from ddk.demo.run import run_demo
from ddk.table import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="/tmp/ddk-cross")
    parser.add_argument("--methods", nargs="+", default=["cpt", "kd", "ddk"])
    parser.add_argument("--cross-methods", nargs="+", default=["kd", "ddk", "kd:skip", "kd:merge"])
    args = parser.parse_args()
    per_model: dict[str, list[float]] = {}
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        argv = ["demo", "--quick", "--seed", str(seed), "--out", str(out), "--cache-dir",
                str(Path(args.out) / "cache"), "--cross-teacher", "--no-benchmarks",
                "--methods", *args.methods, "--cross-methods", *args.cross_methods]  # fmt: skip
        run_demo(build_parser().parse_args(argv))
        for model, ppl in json.loads((out / "cross_results.json").read_text()).items():
            per_model.setdefault(model, []).append(mean_ppl(ppl))
    rows = []
    for model, values in per_model.items():
        spread = (max(values) - min(values)) / 2
        rows.append([model, f"{statistics.mean(values):.4f} ± {spread:.4f}",
                     " ".join(f"{v:.4f}" for v in values)])  # fmt: skip
    print(f"test perplexity per byte, mean over domains; seeds {args.seeds}")
    print(format_table(["model", "mean ± spread", "per seed"], rows))


if __name__ == "__main__":
    main()
