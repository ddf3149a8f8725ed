"""Served vs offline teacher: the final per-domain test perplexities of two `ddk distill` runs
that differ only in where the teacher's top-k signal comes from (issue 21's target: a served
run within 3 % of the offline run's geometric-mean test perplexity).

    python benchmarks/served_vs_offline.py OFFLINE_RUN SERVED_RUN

Each RUN is a finished run folder (its metrics.jsonl holds the test `final_eval` record). The
runs themselves (same config, seed and steps; `sparse_estimator: topk` in both) are made with
the commands in benchmarks/results/served_vs_offline_demo.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ddk.metrics import read_metrics

TARGET = 0.03  # issue 21: relative difference of the geometric-mean test perplexity


def final_test(run: Path) -> dict[str, dict]:
    for record in reversed(read_metrics(run / "metrics.jsonl")):
        if record.get("event") == "final_eval" and record.get("split") == "test":
            return record["domains"]
    raise SystemExit(f"error: {run}/metrics.jsonl has no test final_eval record")


def geo_mean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def worst(domains: dict[str, dict]) -> tuple[str, float]:
    name = max(domains, key=lambda d: domains[d]["ratio"])
    return name, domains[name]["ratio"]


def table(offline: dict[str, dict], served: dict[str, dict]) -> str:
    rows = ["| domain | teacher | offline student | served student | served / offline |"]
    rows.append("|---|---:|---:|---:|---:|")
    for d in offline:
        o, s = offline[d]["student_ppl"], served[d]["student_ppl"]
        rows.append(f"| {d} | {offline[d]['teacher_ppl']:.2f} | {o:.2f} | {s:.2f} | {s / o:.4f} |")
    go = geo_mean([offline[d]["student_ppl"] for d in offline])
    gs = geo_mean([served[d]["student_ppl"] for d in offline])
    gt = geo_mean([offline[d]["teacher_ppl"] for d in offline])
    rows.append(f"| geometric mean | {gt:.2f} | {go:.2f} | {gs:.2f} | {gs / go:.4f} |")
    (wo, ro), (ws, rs) = worst(offline), worst(served)
    rows.append(f"| worst ratio S/T | | {ro:.3f} ({wo}) | {rs:.3f} ({ws}) | {rs / ro:.4f} |")
    diff = gs / go - 1
    verdict = "meets" if abs(diff) <= TARGET else "MISSES"
    rows.append("")
    rows.append(
        f"Geometric-mean test perplexity: served is {100 * diff:+.2f} % of offline "
        f"({verdict} the {100 * TARGET:.0f} % target)."
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("offline", type=Path, help="the offline run folder")
    parser.add_argument("served", type=Path, help="the served run folder")
    args = parser.parse_args()
    offline, served = final_test(args.offline), final_test(args.served)
    if set(offline) != set(served):
        raise SystemExit("error: the two runs have different domains")
    print(table(offline, served))


if __name__ == "__main__":
    main()
