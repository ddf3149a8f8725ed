"""The demo's result over several seeds: worst-domain ratio and geometric-mean perplexity per
method, as mean ± spread (half the max-min range).

    python benchmarks/demo_seeds.py [--seeds 0 1 2] [--quick] [--out /tmp/ddk-seeds]
        [--methods cpt kd ddk equal ddk_no_smoothing] [--init-floor-variant]

Each seed builds its own corpus, tokenizer, teacher and student (cached under --out), then runs
the methods (default cpt, kd, ddk, equal, ddk_no_smoothing; --init-floor-variant adds ddk+floor)
at equal tokens: exactly `ddk demo --seed S --methods ...`. Numbers are on the test split.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from ddk.cli import build_parser
from ddk.demo.run import run_demo
from ddk.table import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="/tmp/ddk-seeds")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["cpt", "kd", "ddk", "equal", "ddk_no_smoothing"],
        help="as `ddk demo --methods` (ddk+floor = ddk with distill.init_floor=true)",
    )
    parser.add_argument(
        "--init-floor-variant", action="store_true", help="also run ddk+floor (init_floor=true)"
    )
    args = parser.parse_args()

    results: dict[str, dict[str, list[float]]] = {}
    splits: set[str] = set()
    for seed in args.seeds:
        argv = [
            "demo",
            "--seed",
            str(seed),
            "--out",
            str(Path(args.out) / f"seed{seed}"),
            "--cache-dir",
            str(Path(args.out) / "cache"),
        ]
        if args.quick:
            argv.append("--quick")
        argv += ["--methods", *args.methods]
        if args.init_floor_variant:
            argv.append("--init-floor-variant")
        summary = run_demo(build_parser().parse_args(argv))
        splits.add(summary["split"])
        for run in summary["runs"]:
            r = results.setdefault(run["label"], {"worst": [], "geo": []})
            r["worst"].append(run["worst_ratio"])
            r["geo"].append(run["geomean_ppl"])

    def cell(values):
        spread = (max(values) - min(values)) / 2
        return f"{statistics.mean(values):.2f} ± {spread:.2f}"

    rows = [
        [label, cell(r["worst"]), cell(r["geo"]), ", ".join(f"{v:.2f}" for v in r["worst"])]
        for label, r in results.items()
    ]
    split = "/".join(sorted(splits))
    print(
        f"\nseeds {args.seeds} ({'quick' if args.quick else 'full'} demo), {split} split"
        + (" (held out: nothing was tuned on it)" if split == "test" else " (no test split)")
    )
    print(
        format_table(
            ["method", "worst-domain ratio S/T", "geo-mean ppl", "worst ratio per seed"], rows
        )
    )


if __name__ == "__main__":
    main()
