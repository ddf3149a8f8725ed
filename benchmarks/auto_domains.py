"""DDK without domain labels: the demo corpus with its labels removed, domains found by
`prepare.auto_domains`, scored on the TRUE domains' held-out documents.

    python benchmarks/auto_domains.py [--n 4|auto] [--quick] [--out /tmp/ddk-auto] [--seed 0]
        [--train-seeds 0 1 2]

Needs the demo's cached tokenizer, teacher and student (`ddk demo --quick` builds them under
~/.cache/ddk/demo; --cache-dir points elsewhere). Steps:
  1. build the demo corpus; prepare it with its labels (`labelled`);
  2. write the same documents, shuffled, as one JSONL without a domain field; prepare it with
     --auto-domains N and --exclude-heldout labelled (so no held-out document is trained on);
  3. distill kd and ddk on `labelled`, ddk on the auto domains: same steps, tokens and seed;
     and, as a control, ddk with the true labels but its validation split drawn like the auto
     folder's (prepare the labelled corpus again with --exclude-heldout labelled);
  4. score every model with the labelled folder's TEST split (true domains; no run steered by
     it or trained on it), exactly as `ddk eval --model RUN/final --data labelled` does, and
     print a table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

from ddk.config import PrepareSection
from ddk.data.prepare import prepare
from ddk.demo.corpus import build_demo_corpus
from ddk.demo.run import FULL, QUICK, distill_stage
from ddk.table import format_table


def _unlabelled(corpus: Path, out: Path, seed: int) -> list[str]:
    """All documents, shuffled, without labels; returns each line's true domain."""
    items = []
    for f in sorted(corpus.glob("*/*.jsonl")):
        for line in f.open():
            items.append((f.parent.name, json.loads(line)["text"]))
    random.Random(seed).shuffle(items)
    with open(out, "w") as fh:
        for _, text in items:
            fh.write(json.dumps({"text": text}) + "\n")
    return [d for d, _ in items]


def _ppl(model_dir: Path, data: Path) -> dict[str, float]:
    import torch

    from ddk.data.dataset import PreparedData
    from ddk.evaluate import domain_perplexities
    from ddk.models import load_model

    prepared = PreparedData(data)
    model = load_model(str(model_dir), dtype=torch.float32, what="model")
    result = domain_perplexities(
        model, prepared, vocab_size=prepared.vocab_size, split="test", batch_size=16
    )
    return {d: r["ppl"] for d, r in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="4", help="auto_domains: a number or 'auto'")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick sizes")
    parser.add_argument("--out", default="/tmp/ddk-auto")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "ddk" / "demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="distillation steps per run")
    parser.add_argument(
        "--train-seeds", type=int, nargs="+", default=[0], help="trainer seeds (mean ± spread)"
    )
    args = parser.parse_args()
    n = args.n if args.n == "auto" else int(args.n)
    size = QUICK if args.quick else FULL
    steps = args.steps or size.distill_steps
    tag = (
        f"{'quick' if args.quick else 'full'}-scale{size.scale:g}-seed{args.seed}"
        f"-t{size.teacher_steps}-s{size.student_steps}"
    )
    cache = Path(args.cache_dir).expanduser() / tag
    teacher, student, tok = (
        cache / "teacher" / "final",
        cache / "student" / "final",
        cache / "tokenizer",
    )
    if not (teacher.exists() and student.exists() and tok.exists()):
        raise SystemExit(
            f"no cached demo models in {cache}: run `ddk demo{' --quick' * args.quick}` first"
        )
    out = Path(args.out)
    configs = out / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    corpus = out / "corpus"
    build_demo_corpus(corpus, scale=size.scale, seed=args.seed)
    common = dict(
        tokenizer=str(tok),
        seq_len=size.seq_len,
        val_sequences=size.val_sequences,
        seed=args.seed,
        overwrite=True,
    )
    labelled = out / "labelled"
    prepare(PrepareSection(input=str(corpus), output=str(labelled), **common), str(tok))
    truth = _unlabelled(corpus, out / "unlabelled.jsonl", args.seed)
    auto = out / "auto"
    t1 = time.perf_counter()
    prepare(
        PrepareSection(
            input=str(out / "unlabelled.jsonl"),
            output=str(auto),
            auto_domains=n,
            exclude_heldout=str(labelled),
            **common,
        ),
        str(tok),
    )
    prep_s = time.perf_counter() - t1
    # Control: the true labels, but DDK's own validation split drawn like the auto folder's
    # (from the documents `labelled` does not hold out). Separates the clustering's effect from
    # the luck of which few documents DDK measures each domain on.
    control = out / "labelled_own_val"
    prepare(
        PrepareSection(
            input=str(corpus), output=str(control), exclude_heldout=str(labelled), **common
        ),
        str(tok),
    )
    from sklearn.metrics import adjusted_rand_score

    assigned = [json.loads(line)["domain"] for line in (auto / "assignments.jsonl").open()]
    manifest = json.loads((auto / "manifest.json").read_text())
    excluded = manifest["auto_domains"]["excluded_heldout_documents"]
    kept_truth = _kept_truth(truth, auto)
    ari = adjusted_rand_score(kept_truth, assigned)

    runs = [  # (label, method, data, folder)
        ("kd (labels)", "kd", labelled, "labelled_runs"),
        ("ddk (labels)", "ddk", labelled, "labelled_runs"),
        ("ddk (labels, own val)", "ddk", control, "control_runs"),
        (f"ddk (auto {n})", "ddk", auto, "auto_runs"),
    ]
    teacher_ppl = _ppl(teacher, labelled)
    before = _ppl(student, labelled)
    domains = list(teacher_ppl)
    per_seed: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in runs}
    for s in args.train_seeds:  # the trainer's seed; corpus and models stay those of --seed
        for label, method, data, folder in runs:
            run = distill_stage(
                method, teacher, student, data, out / f"seed{s}" / folder, size, steps, s, configs
            )
            per_seed[label].append(_ppl(run / "final", labelled))

    def ratio(p):
        return max(p[d] / teacher_ppl[d] for d in domains)

    def worst(p):
        d = max(domains, key=lambda d: p[d] / teacher_ppl[d])
        return f"{p[d] / teacher_ppl[d]:.3f} ({d})"

    def geo(p):
        return math.exp(sum(math.log(p[d]) for d in domains) / len(domains))

    results = {
        label: {d: statistics.mean(p[d] for p in ps) for d in domains}
        for label, ps in per_seed.items()
    }
    headers = ["true domain", "teacher", "student before", *results]
    rows = [[d, teacher_ppl[d], before[d], *(r[d] for r in results.values())] for d in domains]
    rows.append(
        ["geometric mean", geo(teacher_ppl), geo(before), *(geo(r) for r in results.values())]
    )
    if len(args.train_seeds) == 1:
        rows.append(["worst ratio S/T", 1.0, worst(before), *(worst(r) for r in results.values())])
    else:
        spread = [
            f"{statistics.mean(map(ratio, ps)):.3f} ± "
            f"{(max(map(ratio, ps)) - min(map(ratio, ps))) / 2:.3f}"
            for ps in per_seed.values()
        ]
        rows.append(["worst ratio S/T (mean ± half-range)", 1.0, worst(before), *spread])
        rows.append(
            ["worst ratio per seed", "", ""]
            + [", ".join(f"{ratio(p):.2f}" for p in ps) for ps in per_seed.values()]
        )
    print(f"\nauto-domains: {', '.join(manifest['domains'])}")
    print(
        f"adjusted Rand index vs true domains: {ari:.3f}; held-out documents excluded: "
        f"{excluded}; auto prepare took {prep_s:.1f}s; total {time.perf_counter() - t0:.0f}s"
    )
    print(
        "test perplexity on the TRUE domains (labelled test split; lower is better; mean "
        f"over trainer seeds {args.train_seeds})"
    )
    print(format_table(headers, rows))


def _kept_truth(truth: list[str], auto: Path) -> list[str]:
    """True domains of the documents auto prepare kept (assignments name their line index)."""
    records = [json.loads(line)["record"] for line in (auto / "assignments.jsonl").open()]
    return [truth[r] for r in records]


if __name__ == "__main__":
    main()
