"""DDK without domain labels: a corpus with its labels removed, domains found by
`prepare.auto_domains`, scored against the TRUE domains.

    python benchmarks/auto_domains.py --cluster-only [--shape-weights 1] [--seed 0]
    python benchmarks/auto_domains.py --corpus demo|unbalanced [--n N|auto] [--quick]
        [--out /tmp/ddk-auto] [--seed 0] [--train-seeds 0 1 2]

--cluster-only (no models, minutes): for the balanced demo corpus and the `unbalanced` corpus of
ddk.demo.corpora (one domain of 84 %, two of 7 %, C and Tcl code under 1 % each), clusters with
the true N and with `auto`, and prints the adjusted Rand index and, per true domain, its recall
(the share of its documents in its biggest cluster) and purity (that cluster's share of the
domain). Target per domain of at least 30 documents: both >= 0.8. Then `auto` on four corpora
of one domain each, which should stop with "looks like one domain". --shape-weights and
--size-exponents repeat everything per weight of the shape block (ddk.data.embed.SHAPE_WEIGHT)
and per exponent of Ward's size factor (ddk.data.clustering.SIZE_EXPONENT).

--corpus (distillation, CPU-heavy: run it alone, in the background):
  1. build the corpus; prepare it with its labels (`labelled`). The demo corpus uses the
     demo's cached tokenizer, teacher and student (`ddk demo [--quick]` builds them); the
     unbalanced corpus trains its own tokenizer, teacher (natural mix) and student (mostly
     prose, no code), cached under --cache-dir, the way `ddk demo` does;
  2. write the same documents, shuffled, as one JSONL without a domain field; prepare it with
     --auto-domains N and --exclude-heldout labelled (so no held-out document is trained on);
  3. distill kd and ddk on `labelled`, ddk on the auto domains: same steps, tokens and seed;
     and, as a control, ddk with the true labels but its validation split drawn like the auto
     folder's (prepare the labelled corpus again with --exclude-heldout labelled);
  4. score every model with the labelled folder's TEST split (true domains; no run steered by
     it or trained on it), exactly as `ddk eval --model RUN/final --data labelled` does, and
     print the clustering's scores and a perplexity table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import time
from pathlib import Path

from ddk.config import PrepareSection
from ddk.data import clustering, embed
from ddk.data.autodomains import DomainPlan
from ddk.data.prepare import prepare
from ddk.data.sources import discover
from ddk.demo.corpora import Shape, build_corpus
from ddk.demo.corpus import build_demo_corpus, corpus_texts
from ddk.demo.run import FULL, QUICK, DemoSize, distill_stage, pretrain_models
from ddk.errors import DDKError
from ddk.table import format_table

TARGET = 0.8  # recall and purity each true domain of >= MIN_SCORED documents should reach
MIN_SCORED = 30
# The unbalanced corpus's student: pre-trained mostly on prose, a little of the word problems
# and Han, no code, so it lags the teacher unevenly (most on code), as small models do.
UNBALANCED_STUDENT_MIX = {"prose": 0.8, "math": 0.15, "han": 0.05}
ONE_DOMAIN = {"math": 3000, "prose": 1500, "python": 800, "han": 800}


def _unlabelled(corpus: Path, out: Path, seed: int) -> list[str]:
    """All documents, shuffled, without labels; returns each line's true domain."""
    items = []
    for f in sorted(corpus.glob("*/*.jsonl")):
        for line in f.open(encoding="utf-8"):
            items.append((f.parent.name, json.loads(line)["text"]))
    random.Random(seed).shuffle(items)
    with open(out, "w", encoding="utf-8") as fh:
        for _, text in items:
            fh.write(json.dumps({"text": text}) + "\n")
    return [d for d, _ in items]


def recall_purity(truth: list[str], labels: list[str]) -> dict[str, tuple[int, float, float]]:
    """Per true domain: (documents, share of them in their biggest cluster, that cluster's
    share of the domain)."""
    out = {}
    for d in sorted(set(truth)):
        mine = [lab for t, lab in zip(truth, labels) if t == d]
        best = max(sorted(set(mine)), key=mine.count)
        in_best = [t for t, lab in zip(truth, labels) if lab == best]
        out[d] = (len(mine), mine.count(best) / len(mine), in_best.count(d) / len(in_best))
    return out


def _cluster_row(name: str, n, truth: list[str], labels: list[str], seconds: float) -> list:
    from sklearn.metrics import adjusted_rand_score

    per = recall_purity(truth, labels)
    misses = [d for d, (docs, r, p) in per.items() if docs >= MIN_SCORED and min(r, p) < TARGET]
    return [
        name,
        n,
        len(set(labels)),
        f"{adjusted_rand_score(truth, labels):.3f}",
        "  ".join(f"{d} {r:.2f}/{p:.2f}" for d, (_, r, p) in per.items()),
        "met" if not misses else "missed: " + ", ".join(misses),
        f"{seconds:.0f}",
    ]


def _cluster(path: Path, n, seed: int) -> tuple[list[str], object, float]:
    """Labels for every line of `path` from auto-domains fitted on all of it."""
    cfg = PrepareSection(
        input=str(path), output=str(path.parent / "unused"), auto_domains=n, seed=seed
    )
    t0 = time.perf_counter()
    plan = DomainPlan(cfg, discover(cfg.input), None, progress=True)
    labels = [d for d, text, _ in plan.documents(path.parent) if text is not None]
    return labels, plan.models[None], time.perf_counter() - t0


def cluster_only(args) -> None:
    out = Path(args.out)
    corpora = {}
    demo = out / "demo"
    build_demo_corpus(demo, scale=QUICK.scale, seed=args.seed)
    corpora[f"demo (scale {QUICK.scale})"] = (demo, 4)
    unbalanced = out / "unbalanced"
    build_corpus("unbalanced", unbalanced, seed=args.seed)
    corpora["unbalanced"] = (unbalanced, len(list(unbalanced.glob("*/*.jsonl"))))
    singles = {}
    for source, docs in ONE_DOMAIN.items():
        folder = out / f"only_{source}"
        build_corpus(Shape(f"only {source}", {source: docs}), folder, seed=args.seed)
        singles[f"only {source} ({docs})"] = folder
    rows, auto_rows, one_rows = [], [], []
    settings = [(w, e) for w in args.shape_weights for e in args.size_exponents]
    for weight, exponent in settings:
        embed.SHAPE_WEIGHT, clustering.SIZE_EXPONENT = weight, exponent
        setting = f"{weight:g} / {exponent:g}"
        for name, (folder, true_n) in corpora.items():
            path = out / f"{folder.name}.jsonl"
            truth = _unlabelled(folder, path, args.seed)
            for n in (true_n, "auto"):
                labels, model, seconds = _cluster(path, n, args.seed)
                rows.append([setting, *_cluster_row(name, n, truth, labels, seconds)])
                if n == "auto":
                    closest = model.auto["closest_pair_by_n"]
                    auto_rows.append(
                        [setting, name, true_n, model.auto["picked"]]
                        + [f"{closest[str(k)]:.2f}" for k in range(2, 9)]
                    )
        for name, folder in singles.items():
            path = out / f"{folder.name}.jsonl"
            _unlabelled(folder, path, args.seed)
            try:
                labels, model, _ = _cluster(path, "auto", args.seed)
                verdict = f"{model.auto['picked']} domains: {', '.join(model.names)}"
            except DDKError as e:
                halves = re.search(r"halves differ by ([0-9.]+)", str(e))
                verdict = f"one domain (halves {halves.group(1)} apart)" if halves else str(e)
            one_rows.append([setting, name, verdict])
    print(f"\nauto-domains on corpora without labels (seed {args.seed}); recall/purity per true")
    print(f"domain, target >= {TARGET} for domains of >= {MIN_SCORED} documents")
    print(
        format_table(
            ["shape w / size exp", "corpus", "N", "found", "ARI", "recall/purity", "target", "s"],
            rows,
        )
    )
    print("\n`auto`: closest pair of domains (cosine distance of mean features) by N; it picks")
    print("the largest N whose closest pair is at least clustering.MIN_DOMAIN_DISTANCE apart")
    print(
        format_table(
            ["shape w / size exp", "corpus", "true N", "picked", *(f"N={k}" for k in range(2, 9))],
            auto_rows,
        )
    )
    print("\n`auto` on corpora of one domain (should say so)")
    print(format_table(["shape w / size exp", "corpus", "auto-domains says"], one_rows))


# --------------------------------------------------------------------------- distillation


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


def _demo_models(cache: Path, size: DemoSize, quick: bool, seed: int) -> tuple[Path, ...]:
    tag = (
        f"{'quick' if quick else 'full'}-scale{size.scale:g}-seed{seed}"
        f"-t{size.teacher_steps}-s{size.student_steps}"
    )
    where = cache / tag
    teacher, student, tok = (
        where / "teacher" / "final",
        where / "student" / "final",
        where / "tokenizer",
    )
    if not (teacher.exists() and student.exists() and tok.exists()):
        raise SystemExit(
            f"no cached demo models in {where}: run `ddk demo{' --quick' * quick}` first"
        )
    return teacher, student, tok


def _own_models(corpus: Path, cache: Path, size: DemoSize, seed: int, configs: Path, common):
    """Tokenizer, teacher (natural mix) and student (UNBALANCED_STUDENT_MIX) for a corpus the
    demo models never saw; built once per corpus, size and seed, then cached."""
    from ddk.demo.build import train_bpe_tokenizer

    tok = cache / "tokenizer"
    teacher, student = cache / "teacher" / "final", cache / "student" / "final"
    if teacher.exists() and student.exists():
        return teacher, student, tok
    if not (tok / "tokenizer.json").exists():
        train_bpe_tokenizer(corpus_texts(corpus), size.vocab, tok)
    data = cache / "prepared"
    prepare(PrepareSection(input=str(corpus), output=str(data), **common(tok)), str(tok))
    domains = [p.name for p in sorted(corpus.iterdir()) if p.is_dir()]
    student_mix = {d: w for d, w in UNBALANCED_STUDENT_MIX.items() if d in domains}
    pretrain_models(cache, data, size, seed, configs, time.time(), student_mix)
    return teacher, student, tok


def distill(args) -> None:
    n = args.n if args.n in (None, "auto") else int(args.n)
    size = QUICK if args.quick else FULL
    steps = args.steps or size.distill_steps
    out = Path(args.out)
    configs = out / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir).expanduser()
    t0 = time.perf_counter()

    def common(tok):
        return dict(
            tokenizer=str(tok),
            seq_len=size.seq_len,
            val_sequences=size.val_sequences,
            seed=args.seed,
            overwrite=True,
        )

    corpus = out / "corpus"
    if args.corpus == "demo":
        build_demo_corpus(corpus, scale=size.scale, seed=args.seed)
        teacher, student, tok = _demo_models(cache, size, args.quick, args.seed)
    else:
        build_corpus(args.corpus, corpus, seed=args.seed)
        tag = f"{args.corpus}-{'quick' if args.quick else 'full'}-seed{args.seed}"
        teacher, student, tok = _own_models(
            corpus, cache.parent / "auto-domains" / tag, size, args.seed, configs, common
        )
    true_n = len([p for p in corpus.iterdir() if p.is_dir()])
    n = n or true_n
    labelled = out / "labelled"
    prepare(PrepareSection(input=str(corpus), output=str(labelled), **common(tok)), str(tok))
    truth = _unlabelled(corpus, out / "unlabelled.jsonl", args.seed)
    auto = out / "auto"
    t1 = time.perf_counter()
    prepare(
        PrepareSection(
            input=str(out / "unlabelled.jsonl"),
            output=str(auto),
            auto_domains=n,
            exclude_heldout=str(labelled),
            **common(tok),
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
            input=str(corpus), output=str(control), exclude_heldout=str(labelled), **common(tok)
        ),
        str(tok),
    )
    records = [json.loads(line) for line in (auto / "assignments.jsonl").open()]
    kept_truth = [truth[r["record"]] for r in records]  # records index the unlabelled lines
    manifest = json.loads((auto / "manifest.json").read_text())
    excluded = manifest["auto_domains"]["excluded_heldout_documents"]
    cluster_table = format_table(
        ["corpus", "N", "found", "ARI", "recall/purity", "target", "s"],
        [_cluster_row(args.corpus, n, kept_truth, [r["domain"] for r in records], prep_s)],
    )

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
        f"held-out documents excluded: {excluded}; auto prepare took {prep_s:.1f}s; "
        f"total {time.perf_counter() - t0:.0f}s"
    )
    print(cluster_table)
    print(
        "test perplexity on the TRUE domains (labelled test split; lower is better; mean "
        f"over trainer seeds {args.train_seeds})"
    )
    print(format_table(headers, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster-only", action="store_true", help="clustering scores only")
    parser.add_argument(
        "--shape-weights", type=float, nargs="+", default=[embed.SHAPE_WEIGHT],
        help="--cluster-only: weights of the shape block to compare",
    )  # fmt: skip
    parser.add_argument(
        "--size-exponents", type=float, nargs="+", default=[clustering.SIZE_EXPONENT],
        help="--cluster-only: exponents of Ward's size factor to compare",
    )  # fmt: skip
    parser.add_argument("--corpus", default="demo", choices=["demo", "unbalanced"])
    parser.add_argument("--n", help="auto_domains: a number or 'auto' (default: the true N)")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick sizes")
    parser.add_argument("--out", default="/tmp/ddk-auto")
    parser.add_argument(
        "--cache-dir",
        default=str(Path.home() / ".cache" / "ddk" / "demo"),
        help="the demo's cached models; the unbalanced corpus's go beside it (auto-domains/)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="distillation steps per run")
    parser.add_argument(
        "--train-seeds", type=int, nargs="+", default=[0], help="trainer seeds (mean ± spread)"
    )
    args = parser.parse_args()
    if args.cluster_only:
        cluster_only(args)
    else:
        distill(args)


if __name__ == "__main__":
    main()
