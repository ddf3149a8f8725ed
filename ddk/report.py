"""`ddk report RUN_DIR [RUN_DIR ...]`: plots and a summary of one or more distillation runs.

Reads each run's `config.yaml` and `metrics.jsonl` and writes, into one folder:

- `perplexity_by_domain.png`: teacher, student before and every run after, per domain
  (the paper's Figure 1);
- `ratio_over_training.png`: ℓ_S/ℓ_T per domain over training, one panel per run (Figure 3);
- `domain_weights.png`: the domain sampling weights over training, one panel per run;
- `loss_curves.png`: CE and KL over training;
- `benchmarks_over_training.png`: benchmark scores against step, when runs scored them more
  than once (`eval.every_intervals`);
- `summary.md`: the benchmark scores as the paper's Table 1 lays them out (one row per run, one
  column per task grouped by domain, the average, beside the test perplexity and the worst
  ratio) when the runs have any, per-domain perplexities and ratios, the worst-domain ratio
  (the largest ℓ_S/ℓ_T) and the geometric-mean perplexity of every run;
- `report.html`: all of the above on one self-contained page (images inlined as base64).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas on save
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ddk.errors import DDKError
from ddk.metrics import (
    BENCHMARK_EVAL,
    BENCHMARKS_FORMAT,
    DOMAIN_UPDATE,
    FINAL_EVAL,
    DomainStats,
    EvalRecord,
    StepRecord,
    json_number,
    read_metrics,
    read_records,
)
from ddk.ownership import is_owned, ownership_record, read_record, refuse_links
from ddk.table import fmt_cell, format_table

PLOTS = (
    ("perplexity_by_domain.png", "Perplexity by domain"),
    ("ratio_over_training.png", "Student/teacher perplexity ratio over training"),
    ("domain_weights.png", "Domain weights over training"),
    ("loss_curves.png", "Loss curves"),
    ("benchmarks_over_training.png", "Benchmark scores over training"),
)
NA = "n/a"  # a ratio that cannot exist (the run has no teacher)


# ----------------------------------------------------------------------------- loading
def _variant(method: str, distill: dict, model: dict) -> str:
    """A run's label: a variant of a method (a preset, else focus: worst, else the opt-in
    interval-0 floor) gets its own, and so does a teacher per domain."""
    if distill.get("preset"):
        label = f"{method}+{distill['preset']}"
    elif distill.get("focus") == "worst":
        label = f"{method}+worst"
    else:
        label = method + ("+floor" if distill.get("init_floor") else "")
    return label + ("+domain" if model.get("teachers") else "")


class _Run:
    """One run folder, parsed: its config, training logs and evaluation records."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.name or str(path)
        self.config = _read_config(path)
        distill = self.config.get("distill") or {}
        trainer = self.config.get("trainer") or {}
        self.method = str(distill.get("method") or "unknown")
        self.variant = _variant(self.method, distill, self.config.get("model") or {})
        self.K = distill.get("K")
        self.alpha = distill.get("alpha")
        self.gamma = distill.get("gamma")
        self.max_steps = trainer.get("max_steps")
        self.label = self.method

        records = read_records(path / "metrics.jsonl")
        self.logs: list[StepRecord] = sorted(
            (r for r in records if isinstance(r, StepRecord)), key=lambda r: r.step
        )
        evals: dict[tuple[str, int], EvalRecord] = {}
        for r in records:  # a resumed run may repeat a record; the later one wins
            if isinstance(r, EvalRecord):
                evals[(r.event, r.step)] = r
        # at equal steps a domain_update comes before the final_eval
        self.evals: list[EvalRecord] = sorted(
            evals.values(), key=lambda r: (r.step, r.event == FINAL_EVAL)
        )
        if not self.evals:
            raise DDKError(
                f"'{path / 'metrics.jsonl'}' has no evaluation records (domain_update or "
                "final_eval); the run stopped before its first evaluation"
            )
        scored: dict[int, dict] = {}
        for r in read_metrics(path / "metrics.jsonl"):  # a resumed run's later record wins
            if (
                isinstance(r, dict)
                and r.get("event") == BENCHMARK_EVAL
                and isinstance(r.get("step"), int | float)
            ):
                scored[int(r["step"])] = r
        in_order = [scored[step] for step in sorted(scored)]
        self.benchmarks = [r for r in in_order if isinstance(r.get("tasks"), dict)]
        self.benchmark_failures = [r for r in in_order if "failed" in r]
        finals = [r for r in self.evals if r.event == FINAL_EVAL]
        self.has_final = bool(finals)
        self.final = finals[-1] if finals else self.evals[-1]
        self.domains = list(dict.fromkeys(d for r in self.evals for d in r.domains))
        self.teachers = _domain_teachers(self.config, self.domains)
        # the final numbers' split ("test": held out; "val": what DDK steered by)
        self.split = self.final.split or "val"
        updates = [r for r in self.evals if r.event == DOMAIN_UPDATE]
        self.epochs = {
            d: e.epochs
            for d, e in (updates[-1].domains.items() if updates else ())
            if e.epochs is not None
        }

    @property
    def steps(self) -> int | None:
        return max(r.step for r in (self.final, *self.logs[-1:]))

    @property
    def tokens(self) -> int | None:
        tokens = [r.tokens for r in self.logs if r.tokens is not None]
        return tokens[-1] if tokens else None


def _domain_teachers(config: dict, domains: list[str]) -> dict[str, str]:
    """{domain: its teacher} of a run that mapped domains to teachers (model.teachers), else {}."""
    model = config.get("model") or {}
    mapped = model.get("teachers") or {}
    return {d: mapped.get(d, model.get("teacher")) for d in domains} if mapped else {}


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        return {}
    try:
        cfg = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid YAML"
        raise DDKError(f"cannot read '{cfg_path}': {first}") from None
    return cfg if isinstance(cfg, dict) else {}


def _load_runs(run_dirs) -> list[_Run]:
    if isinstance(run_dirs, str | Path):
        run_dirs = [run_dirs]
    run_dirs = list(run_dirs or [])
    if not run_dirs:
        raise DDKError("no run folders given; pass one or more folders written by `ddk distill`")
    runs = []
    for d in run_dirs:
        path = Path(d)
        if not path.is_dir():
            raise DDKError(f"run folder '{path}' does not exist")
        if not (path / "metrics.jsonl").is_file():
            raise DDKError(
                f"'{path}' has no metrics.jsonl; is it a folder written by `ddk distill`?"
            )
        runs.append(_Run(path))
    _assign_labels(runs)
    return runs


def _assign_labels(runs: list[_Run]) -> None:
    """The method name; plus the folder name when two runs share a method."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.variant] = counts.get(r.variant, 0) + 1
    seen: set[str] = set()
    for r in runs:
        label = r.variant if counts[r.variant] == 1 else f"{r.variant} ({r.name})"
        base, n = label, 2
        while label in seen:  # same method and same folder name under different parents
            label = f"{base} #{n}"
            n += 1
        seen.add(label)
        r.label = label


# ----------------------------------------------------------------------------- numbers
def _rank(ratio: float) -> float:
    """Sort key for ratios: NaN (a diverged domain) ranks as infinity, worse than any number."""
    return math.inf if ratio != ratio else ratio


def _geomean(values) -> float | None:
    values = list(values)
    if not values:
        return None
    if any(v != v or v <= 0 for v in values):  # NaN or a non-positive perplexity
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _teacher_column(runs: list[_Run], domains: list[str]) -> tuple[dict, bool]:
    """The teacher perplexity per domain, and whether the runs disagree on it (runs distilled
    from different teachers: compare with care)."""
    teacher: dict[str, float | None] = {d: None for d in domains}
    mismatch = False
    for r in runs:
        # the teacher of the reported numbers: the final evaluation's split, not the curves'
        for rec in [r.final] if r.final.split else r.evals:
            for d, e in rec.domains.items():
                t = e.teacher_ppl
                if teacher.get(d) is None:
                    teacher[d] = t
                elif t is not None and abs(t - teacher[d]) > 1e-3 * abs(teacher[d]):
                    mismatch = True
    return teacher, mismatch


def _before_column(runs: list[_Run], domains: list[str]) -> tuple[dict, dict, str | None]:
    """The student before training per domain (and its ratio): the step-0 evaluation of the
    first run that has one, on the final evaluation's split when it was recorded there."""
    before: dict[str, float | None] = {d: None for d in domains}
    ratios: dict[str, float] = {}
    for r in runs:
        if any(e.student_before_ppl is not None for e in r.final.domains.values()):
            for d, e in r.final.domains.items():  # step 0, on the final evaluation's split
                before[d] = e.student_before_ppl
                if before[d] is not None and e.teacher_ppl:
                    ratios[d] = before[d] / e.teacher_ppl
            return before, ratios, r.label
        start = [rec for rec in r.evals if rec.event == DOMAIN_UPDATE and rec.step == 0]
        if start:
            for d, e in start[0].domains.items():
                before[d] = e.student_ppl
                ratio = e.best_ratio()
                if ratio is not None and ratio == ratio:
                    ratios[d] = ratio
            return before, ratios, r.label
    return before, ratios, None


def _run_summary(r: _Run) -> dict:
    ppl = {d: e.student_ppl for d, e in r.final.domains.items()}
    ratio = {d: e.best_ratio() for d, e in r.final.domains.items()}
    known = {d: v for d, v in ratio.items() if v is not None}
    # a NaN ratio (the student diverged on that domain) counts as the worst of all
    worst = max(known, key=lambda d: _rank(known[d])) if known else None
    return {
        "label": r.label,
        "method": r.method,
        "run_dir": str(r.path),
        "K": r.K,
        "alpha": r.alpha,
        "gamma": r.gamma,
        "steps": r.steps,
        "tokens": r.tokens,
        "final_step": r.final.step,
        "has_final_eval": r.has_final,
        "has_teacher": bool(known),
        "ppl": ppl,
        "ratio": ratio,
        "worst_domain": worst,
        "worst_ratio": known[worst] if worst is not None else None,
        "geomean_ppl": _geomean(v for v in ppl.values() if v is not None),
        "split": r.split,
        "targets": r.final.targets,
        "epochs": dict(r.epochs),
        "teachers": dict(r.teachers),
    }


def _summarize(runs: list[_Run], references: tuple[dict, ...] = ()) -> dict:
    """`references`: benchmark files (read_benchmark_file) shown as rows above the runs."""
    domains = list(dict.fromkeys(d for r in runs for d in r.domains))
    teacher, teacher_mismatch = _teacher_column(runs, domains)
    before, before_ratio, before_from = _before_column(runs, domains)
    before_worst = max(before_ratio, key=before_ratio.get) if before_ratio else None
    out_runs = [{**_run_summary(r), **_run_benchmarks(r)} for r in runs]
    judged = [r for r in out_runs if r["worst_ratio"] is not None]
    best = min(judged, key=lambda r: _rank(r["worst_ratio"]))["label"] if judged else None
    teacher_vals = [v for v in teacher.values() if v is not None]
    before_vals = [v for v in before.values() if v is not None]
    return {
        "domains": domains,
        "teacher": teacher,
        "teacher_geomean_ppl": _geomean(teacher_vals)
        if len(teacher_vals) == len(domains)
        else None,
        "before": before,
        "before_from": before_from,
        "before_geomean_ppl": _geomean(before_vals) if before_vals else None,
        "before_worst_domain": before_worst,
        "before_worst_ratio": before_ratio[before_worst] if before_worst else None,
        "runs": out_runs,
        "best_run": best,
        "teacher_mismatch": teacher_mismatch,
        # which teacher each domain used (model.teachers) in the first run, whose teacher
        # perplexities the teacher column shows
        "domain_teachers": dict(runs[0].teachers) or None,
        "same_domains": all(set(r.domains) == set(domains) for r in runs),
        "split": "/".join(sorted({r.split for r in runs})),
        "targets": sorted({r.final.targets for r in runs if r.final.targets}),
        "benchmark_columns": _benchmark_columns(
            [r.benchmarks[-1] for r in runs if r.benchmarks] + list(references), domains
        ),
        "benchmark_references": [
            {"label": ref["model"], "file": ref["file"], **_scores(ref)} for ref in references
        ],
    }


def _scores(record: dict) -> dict:
    """A benchmark record's primary scores: per task, per domain, average."""
    return {
        "tasks": {t: json_number(e.get("score")) for t, e in record.get("tasks", {}).items()},
        "domains": {
            d: json_number(e.get("score")) for d, e in (record.get("domains") or {}).items()
        },
        "average": json_number(record.get("average")),
    }


def _run_benchmarks(r: _Run) -> dict:
    """The run's final benchmark scores (its `final` scoring, else its last), every scoring's
    scores by step, and the scorings that failed."""
    finals = [b for b in r.benchmarks if b.get("final")]
    last = (finals or r.benchmarks or [None])[-1]
    return {
        "benchmarks": None if last is None else {"step": last["step"], **_scores(last)},
        "benchmark_history": [{"step": b["step"], **_scores(b)} for b in r.benchmarks],
        "benchmark_failures": [
            {"step": b["step"], "failed": str(b["failed"])} for b in r.benchmark_failures
        ],
    }


def _benchmark_columns(records: list[dict], domains: list[str]) -> list[dict]:
    """Every task any record scored, grouped by domain in the report's domain order (tasks of
    no domain last), in first-seen order within a domain."""
    seen: dict[str, str | None] = {}
    for record in records:
        for task, entry in record.get("tasks", {}).items():
            seen.setdefault(task, entry.get("domain"))
    rank = {d: i for i, d in enumerate(domains)}
    ordered = sorted(seen.items(), key=lambda item: rank.get(item[1], len(rank)))
    return [{"task": t, "domain": d} for t, d in ordered]


def read_benchmark_file(path: str | Path) -> dict:
    """A `ddk eval --out` (or RUN/benchmarks.json) file, for the report's reference rows."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DDKError(f"cannot read benchmark file '{path}': {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != BENCHMARKS_FORMAT:
        raise DDKError(f"'{path}' is not a ddk benchmarks file (written by `ddk eval --out`)")
    if "failed" in payload:
        raise DDKError(f"'{path}' records a failed evaluation: {payload['failed']}")
    return {**payload, "file": str(path)}


def summarize_runs(run_dirs, benchmark_files=()) -> dict:
    """The numbers the report shows.

    Returns ``{"domains", "teacher": {domain: ppl|None}, "before": {domain: ppl|None},
    "before_from", "teacher_geomean_ppl", "before_geomean_ppl", "before_worst_domain",
    "before_worst_ratio", "best_run", "same_domains", "teacher_mismatch", "domain_teachers"
    ({domain: teacher} of a first run with model.teachers, else None),
    "runs": [{"label", "method", "run_dir", "K", "alpha", "gamma", "steps", "tokens",
    "final_step", "has_final_eval", "has_teacher", "ppl": {domain: ppl},
    "ratio": {domain: ratio|None}, "worst_domain", "worst_ratio", "geomean_ppl", "split",
    "epochs": {domain: epochs}, "teachers": {domain: teacher} or {}}], "split"}``. "split" is the held-out split the final numbers
    come from ("test"; "val" for data prepared without a test split or a run without a final
    evaluation); the curves are always on the validation split.
    "worst domain" is the one with the largest student/teacher perplexity ratio; `best_run`
    is the label of the run whose worst-domain ratio is lowest (None without a teacher).
    Benchmarks (lm-eval scores, from `benchmark_eval` records): each run also has
    "benchmarks" ({"step", "tasks": {task: score}, "domains": {domain: mean}, "average"} or
    None), "benchmark_history" (the same per scoring) and "benchmark_failures"; the summary has
    "benchmark_columns" ([{"task", "domain"}], grouped by domain) and "benchmark_references"
    (one entry per file in `benchmark_files`, e.g. the teacher's `ddk eval --out`).
    """
    references = tuple(read_benchmark_file(f) for f in benchmark_files)
    return _summarize(_load_runs(run_dirs), references)


# ----------------------------------------------------------------------------- tables
def _cell(value):
    """Numbers stay numbers (format_table aligns them); missing values are blank."""
    return "" if value is None else value


def _teacher_name(name: str | None) -> str:
    """A teacher's folder as its last two path parts (a hub id stays whole)."""
    parts = Path(name).parts if name else ()
    return "/".join(parts[-2:]) if parts else ""


def _domain_table(summary: dict) -> tuple[list[str], list[list]]:
    mapped = summary.get("domain_teachers")
    headers = ["domain"] + (["teacher"] if mapped else []) + ["teacher ppl", "student before"]
    for r in summary["runs"]:
        headers += [f"{r['label']} ppl", f"{r['label']} ratio"]
    rows = []
    for d in summary["domains"]:
        row = [d] + ([_teacher_name(mapped.get(d))] if mapped else [])
        row += [_cell(summary["teacher"].get(d)), _cell(summary["before"].get(d))]
        for r in summary["runs"]:
            ppl = r["ppl"].get(d)
            row.append(_cell(ppl))
            if ppl is None:
                row.append("")
            else:
                ratio = r["ratio"].get(d)
                row.append(NA if ratio is None else ratio)
        rows.append(row)
    return headers, rows


def _percent(value):
    return "" if value is None else 100.0 * value


def benchmark_table(summary: dict) -> tuple[list[str], list[list]] | None:
    """The paper's Table 1: a row per model (reference files, then runs), a column per task
    grouped by domain, the average; beside them each run's test perplexity and worst ratio."""
    columns = summary["benchmark_columns"]
    runs = [r for r in summary["runs"] if r["benchmarks"]]
    if not columns or not (runs or summary["benchmark_references"]):
        return None
    headers = ["model"] + [
        f"{c['task']} ({c['domain']})" if c["domain"] else c["task"] for c in columns
    ]
    headers += ["average", f"{summary['split']} geo-mean ppl", "worst ratio"]
    rows = []
    for ref in summary["benchmark_references"]:
        scores = [_percent(ref["tasks"].get(c["task"])) for c in columns]
        rows.append([ref["label"], *scores, _percent(ref["average"]), "", ""])
    for r in runs:
        b = r["benchmarks"]
        worst = (
            ""
            if r["worst_ratio"] is None
            else f"{fmt_cell(r['worst_ratio'])} ({r['worst_domain']})"
        )
        rows.append(
            [r["label"], *(_percent(b["tasks"].get(c["task"])) for c in columns)]
            + [_percent(b["average"]), _cell(r["geomean_ppl"]), worst]
        )
    return headers, rows


def _benchmark_notes(summary: dict) -> list[str]:
    notes = []
    if benchmark_table(summary) is None:
        return notes
    notes.append(
        "Benchmark scores in percent, each task's primary lm-eval metric (see each run's "
        "benchmarks.json for every metric and its standard error); average = mean over the "
        "tasks a row scored."
    )
    scored = {
        tuple(sorted(x["tasks"]))
        for x in [r["benchmarks"] for r in summary["runs"] if r["benchmarks"]]
        + summary["benchmark_references"]
    }
    if len(scored) > 1:
        notes.append("The rows scored different tasks: their averages are not comparable.")
    return notes


def _epoch_table(summary: dict) -> tuple[list[str], list[list]] | None:
    """Passes through each domain's training data (a domain far above the rest is memorised)."""
    runs = [r for r in summary["runs"] if r["epochs"]]
    if not runs:
        return None
    headers = ["domain"] + [r["label"] for r in runs]
    rows = [[d] + [_cell(r["epochs"].get(d)) for r in runs] for d in summary["domains"]]
    return headers, rows


def _split_caption(summary: dict) -> str:
    split = summary["split"]
    if split == "test":
        return "Per-domain perplexity on the held-out test split (after = final evaluation)"
    if "/" in split:
        return (
            f"Per-domain perplexity (after = final evaluation) on mixed splits ({split}): some "
            "runs have no test split; compare them with care"
        )
    return (
        f"Per-domain perplexity on the {split} split (after = final evaluation; no test split, "
        "so these are the windows DDK steered by)"
    )


def _run_table(summary: dict) -> tuple[list[str], list[list]]:
    """One row per run: worst-domain ratio (largest ℓ_S/ℓ_T) and geometric-mean perplexity."""
    before = summary["before_geomean_ppl"]
    headers = ["run", "method", "worst domain", "worst ratio", "geo-mean ppl"]
    if before:
        headers.append("geo-mean vs before")
    headers += ["steps", "tokens"]
    rows = []
    for r in summary["runs"]:
        row = [
            r["label"],
            r["method"],
            r["worst_domain"] or NA,
            NA if r["worst_ratio"] is None else r["worst_ratio"],
            _cell(r["geomean_ppl"]),
        ]
        if before:
            g = r["geomean_ppl"]
            row.append(f"{(g / before - 1) * 100:+.1f} %" if g is not None and g == g else "")
        row += [_cell(r["steps"]), _cell(r["tokens"])]
        rows.append(row)
    return headers, rows


def _ranking_note(runs: list[dict]) -> str:
    """The runs from the lowest worst-domain ratio up."""
    judged = sorted(
        (r for r in runs if r["worst_ratio"] is not None), key=lambda r: _rank(r["worst_ratio"])
    )
    if not judged:
        return "No run has teacher perplexities, so there are no ratios to compare."
    best = judged[0]
    text = (
        f"Lowest worst-domain ratio: **{best['label']}** "
        f"({fmt_cell(best['worst_ratio'])} on {best['worst_domain']})"
    )
    others = [
        f"{r['label']} {fmt_cell(r['worst_ratio'])} on {r['worst_domain']}" for r in judged[1:]
    ]
    if others:
        text += "; " + ", ".join(others)
    return text + "."


def _notes(summary: dict) -> list[str]:
    runs = summary["runs"]
    notes = [_ranking_note(runs)]
    ref = _reference_note(summary)
    if ref:
        notes.append(ref)
    notes.append(
        "Worst domain = the domain with the largest student/teacher perplexity ratio "
        "ℓ_S/ℓ_T (what DDK steers by), not the largest perplexity. "
        "Geo-mean ppl = geometric mean of the per-domain perplexities (lower is better)."
    )
    if summary.get("targets"):
        notes.append(
            f"Perplexities count only the targets of the {' / '.join(summary['targets'])}."
        )
    if summary["before_from"]:
        notes.append(f"Student before = the step-0 evaluation of {summary['before_from']}.")
    notes.append(
        "The curves (ratio over training, domain weights) are on the validation split DDK steers "
        f"by; the tables are on the {summary['split']} split."
    )
    if summary["teacher_mismatch"]:
        notes.append(
            "The runs report different teacher perplexities (different teachers or validation "
            "data); the teacher column shows the first run's, each ratio uses the run's own."
        )
    if summary.get("domain_teachers"):
        notes.append("The first run has a teacher per domain (model.teachers), named per row.")
    if not summary["same_domains"]:
        notes.append(
            "The runs were evaluated on different domains; blanks mark a domain a run lacks, "
            "and each geo-mean is over that run's own domains."
        )
    for r in runs:
        for f in r["benchmark_failures"]:
            notes.append(
                f"{r['label']}: the benchmark evaluation at step {f['step']} failed "
                f"({f['failed']}); training went on."
            )
        if not r["has_final_eval"]:
            notes.append(
                f"{r['label']} has no final evaluation (stopped early?); its 'after' numbers are "
                f"from the last interval evaluation, at step {r['final_step']}."
            )
    return notes


def _reference_note(summary: dict) -> str | None:
    """The teacher's and the untrained student's numbers, to read the runs against."""
    ref = []
    if summary["teacher_geomean_ppl"] is not None:
        ref.append(f"teacher geo-mean ppl {fmt_cell(summary['teacher_geomean_ppl'])}")
    if summary["before_geomean_ppl"] is not None:
        text = f"student before: geo-mean ppl {fmt_cell(summary['before_geomean_ppl'])}"
        if summary["before_worst_domain"]:
            text += (
                f", worst-domain ratio {fmt_cell(summary['before_worst_ratio'])} "
                f"({summary['before_worst_domain']})"
            )
        ref.append(text)
    return "Reference: " + "; ".join(ref) + "." if ref else None


def _markdown(summary: dict) -> str:
    parts = ["# DDK distillation report", ""]
    benchmarks = benchmark_table(summary)
    if benchmarks:
        parts += ["## Benchmark scores (lm-eval)", ""]
        parts += [format_table(*benchmarks, markdown=True), ""]
        parts += [f"- {n}" for n in _benchmark_notes(summary)] + [""]
    parts += [f"## {_split_caption(summary)}", ""]
    parts += [format_table(*_domain_table(summary), markdown=True), ""]
    parts += ["## Runs", ""]
    parts += [format_table(*_run_table(summary), markdown=True), ""]
    epochs = _epoch_table(summary)
    if epochs:
        parts += ["## Epochs per domain (passes through its training data)", ""]
        parts += [format_table(*epochs, markdown=True), ""]
    parts += [f"- {n}" for n in _notes(summary)]
    return "\n".join(parts) + "\n"


def _html_table(headers: list[str], rows: list[list]) -> str:
    def td(v, tag="td"):
        num = isinstance(v, int | float) and not isinstance(v, bool)
        cls = ' class="num"' if num else ""
        return f"<{tag}{cls}>{html.escape(fmt_cell(v))}</{tag}>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(td(v) for v in row) + "</tr>" for row in rows)
    return (
        f'<div class="wide"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _md_inline(text: str) -> str:
    """Escape, then turn **bold** into <strong>."""
    parts = html.escape(text).split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


def _html_benchmarks(summary: dict) -> list[str]:
    """The paper-style benchmark table and its notes; nothing when no run scored any."""
    benchmarks = benchmark_table(summary)
    if not benchmarks:
        return []
    notes = "".join(f"<li>{_md_inline(n)}</li>" for n in _benchmark_notes(summary))
    return ["<h2>Benchmark scores (lm-eval)</h2>", _html_table(*benchmarks), f"<ul>{notes}</ul>"]


def _html_plots(out: Path) -> list[str]:
    """Every plot in `out`, inlined as base64 (benchmarks over training: only when drawn)."""
    parts = []
    for name, title in PLOTS:
        if not (out / name).is_file():
            continue
        data = base64.b64encode((out / name).read_bytes()).decode("ascii")
        parts += [
            f"<h2>{html.escape(title)}</h2>",
            f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">',
        ]
    return parts


def _html(summary: dict, out: Path) -> str:
    style = (
        "body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;"
        "margin:2em auto;max-width:1100px;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
        "th,td{border:1px solid #ccc;padding:4px 8px}th{background:#f3f3f3}"
        "td.num{text-align:right;font-variant-numeric:tabular-nums}"
        "img{max-width:100%;border:1px solid #eee;margin:0.5em 0}"
        "code{background:#f3f3f3;padding:0 3px}div.wide{overflow-x:auto}"
    )
    p = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>DDK distillation report</title>",
        f"<style>{style}</style></head><body>",
        "<h1>DDK distillation report</h1>",
        "<p>Runs: "
        + ", ".join(
            f"<strong>{html.escape(r['label'])}</strong> (<code>{html.escape(r['run_dir'])}</code>)"
            for r in summary["runs"]
        )
        + "</p>",
    ]
    p += _html_benchmarks(summary)
    p += [
        f"<h2>{html.escape(_split_caption(summary))}</h2>",
        _html_table(*_domain_table(summary)),
        "<h2>Runs</h2>",
        _html_table(*_run_table(summary)),
        "<ul>" + "".join(f"<li>{_md_inline(n)}</li>" for n in _notes(summary)) + "</ul>",
    ]
    epochs = _epoch_table(summary)
    if epochs:
        p += ["<h2>Epochs per domain (passes through its training data)</h2>"]
        p += [_html_table(*epochs)]
    p += _html_plots(out)
    p.append("<h2>Run configurations</h2>")
    headers = ["run", "folder", "method", "K", "alpha", "gamma", "steps", "tokens", "final eval"]
    rows = [
        [
            r["label"],
            r["run_dir"],
            r["method"],
            _cell(r["K"]),
            _cell(r["alpha"]),
            _cell(r["gamma"]),
            _cell(r["steps"]),
            _cell(r["tokens"]),
            "yes" if r["has_final_eval"] else f"no (last eval at step {r['final_step']})",
        ]
        for r in summary["runs"]
    ]
    p.append(_html_table(headers, rows))
    p.append("</body></html>")
    return "\n".join(p) + "\n"


# ----------------------------------------------------------------------------- plots
def _figure(nplots: int, width: float = 5.0, height: float = 3.6):
    ncols = min(nplots, 3)
    nrows = math.ceil(nplots / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[nplots:]:
        ax.set_visible(False)
    return fig, axes[:nplots]


def _finite(v) -> bool:
    return v is not None and v == v and abs(v) != float("inf")


def _domain_colors(domains: list[str]) -> dict[str, tuple]:
    cmap = colormaps["tab10" if len(domains) <= 10 else "tab20"]
    return {d: cmap(i % cmap.N) for i, d in enumerate(domains)}


def _wide_range(values, factor: float) -> bool:
    values = [v for v in values if _finite(v) and v > 0]
    return bool(values) and max(values) / min(values) > factor


def _plot_perplexity(summary: dict, runs: list[_Run], path: Path) -> None:
    domains = summary["domains"]
    series = []
    if any(v is not None for v in summary["teacher"].values()):
        series.append(("teacher", [summary["teacher"].get(d) for d in domains], "#444444", ""))
    if any(v is not None for v in summary["before"].values()):
        series.append(
            ("student before", [summary["before"].get(d) for d in domains], "#bbbbbb", "//")
        )
    run_colors = _series_colors(len(summary["runs"]))
    for r, c in zip(summary["runs"], run_colors):
        series.append((f"{r['label']} after", [r["ppl"].get(d) for d in domains], c, ""))

    fig, (ax,) = _figure(
        1,
        width=2.0 + min(16.0, max(5.0, 1.0 + len(domains) * (0.3 * len(series) + 0.4))),
        height=4.2,
    )
    x = np.arange(len(domains))
    width = 0.8 / max(len(series), 1)
    for i, (name, values, color, hatch) in enumerate(series):
        ys = [v if _finite(v) else np.nan for v in values]
        ax.bar(
            x - 0.4 + width * (i + 0.5),
            ys,
            width,
            label=name,
            color=color,
            hatch=hatch,
            edgecolor="white" if not hatch else "#888888",
            linewidth=0.5,
        )
    ax.set_xticks(x, domains)
    ax.set_ylabel("perplexity")
    if _wide_range([v for _, vals, _, _ in series for v in vals], 20):
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"Perplexity by domain, {summary['split']} split (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(loc="outside right upper", fontsize="small")
    fig.savefig(path, dpi=110)


def _series_colors(n: int) -> list:
    cmap = colormaps["Set2" if n <= 8 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _plot_ratios(summary: dict, runs: list[_Run], colors: dict, path: Path) -> None:
    fig, axes = _figure(len(runs))
    all_ratios = [e.best_ratio() for r in runs for rec in r.evals for e in rec.domains.values()]
    log = _wide_range(all_ratios + [1.0], 10)
    for ax, r in zip(axes, runs):
        drawn = False
        for d in r.domains:
            pts = [(rec.step, rec.domains[d].best_ratio()) for rec in r.evals if d in rec.domains]
            pts = [(s, v) for s, v in pts if _finite(v)]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, color=colors[d], label=d)
                drawn = True
        ax.set_title(r.label)
        ax.set_xlabel("step")
        if drawn:
            ax.axhline(1.0, color="#999999", linestyle="--", linewidth=0.8)
            ax.set_ylabel("ℓ_S / ℓ_T (perplexity ratio)")
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            steps = [rec.step for rec in r.evals]
            if len(set(steps)) == 1:  # one evaluation: a readable axis, not ±0.04 around it
                ax.set_xlim(steps[0] - 1, max(steps[0] + 1, r.steps or 0))
        else:
            ax.text(
                0.5, 0.5, "no teacher: ratio n/a", ha="center", va="center", transform=ax.transAxes
            )
            ax.set_xticks([])
            ax.set_yticks([])
    _domain_legend(fig, summary["domains"], colors, "line")
    fig.suptitle("Student/teacher perplexity ratio per domain over training")
    fig.savefig(path, dpi=110)


def _domain_legend(fig, domains: list[str], colors: dict, kind: str) -> None:
    """One legend for all panels (a domain has the same colour everywhere), outside the axes."""
    if kind == "line":
        handles = [Line2D([], [], color=colors[d], marker="o", markersize=3) for d in domains]
    else:
        handles = [Patch(color=colors[d], alpha=0.85) for d in domains]
    fig.legend(handles, domains, loc="outside right upper", fontsize="small", title="domain")


def _plot_weights(summary: dict, runs: list[_Run], colors: dict, path: Path) -> None:
    fig, axes = _figure(len(runs))
    for ax, r in zip(axes, runs):
        steps = [rec.step for rec in r.evals]
        names, stacks = [], []
        for d in r.domains:
            ws = [rec.domains.get(d, DomainStats(None)).weight for rec in r.evals]
            if any(_finite(w) for w in ws):
                names.append(d)
                stacks.append([w if _finite(w) else 0.0 for w in ws])
        ax.set_title(r.label)
        ax.set_xlabel("step")
        if not names:
            ax.text(0.5, 0.5, "no weights logged", ha="center", va="center", transform=ax.transAxes)
            continue
        # the last weights hold until the run's last logged step (or one step, at least)
        end = max(r.steps or 0, steps[-1] + (1 if len(steps) == 1 else 0))
        if end > steps[-1]:
            steps = [*steps, end]
            stacks = [[*s, s[-1]] for s in stacks]
        # weights logged at a step hold for the interval that starts there
        ax.stackplot(
            steps, stacks, labels=names, colors=[colors[d] for d in names], step="post", alpha=0.85
        )
        ax.set_xlim(steps[0], steps[-1])
        ax.set_ylim(0, max(1.0, max(sum(col) for col in zip(*stacks))))
        ax.set_ylabel("domain weight")
    _domain_legend(fig, summary["domains"], colors, "patch")
    fig.suptitle("Domain sampling weights (stacked) over training")
    fig.savefig(path, dpi=110)


def _plot_losses(summary: dict, runs: list[_Run], path: Path) -> None:
    fig, axes = _figure(2)
    colors = _series_colors(len(runs))
    for ax, key, title in zip(
        axes, ("ce", "kl"), ("cross-entropy (CE)", "distillation divergence (KL)")
    ):
        drawn = False
        for r, c in zip(runs, colors):
            pts = [(rec.step, getattr(rec, key)) for rec in r.logs]
            pts = [(s, v) for s, v in pts if _finite(v)]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=c, label=r.label, linewidth=1.2)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(key.upper())
        if drawn:
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Training losses")
    fig.savefig(path, dpi=110)


def _plot_benchmarks(summary: dict, path: Path) -> bool:
    """Score against step (average, then each domain's mean), a line per run; only when some
    run scored more than once (eval.every_intervals). Returns whether it was drawn."""
    runs = [r for r in summary["runs"] if len(r["benchmark_history"]) > 1]
    if not runs:
        return False
    domains = [
        d
        for d in summary["domains"]
        if any(d in h["domains"] for r in runs for h in r["benchmark_history"])
    ]
    panels = [("average", None)] + [(f"{d} (mean of its tasks)", d) for d in domains]
    fig, axes = _figure(len(panels))
    colors = _series_colors(len(summary["runs"]))
    for ax, (title, domain) in zip(axes, panels):
        for r, c in zip(summary["runs"], colors):
            pts = [
                (h["step"], h["average"] if domain is None else h["domains"].get(domain))
                for h in r["benchmark_history"]
            ]
            pts = [(step, 100.0 * v) for step, v in pts if _finite(v)]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, color=c, label=r["label"])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("score (%)")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    fig.suptitle("Benchmark scores over training (reporting only: DDK never steers by them)")
    fig.savefig(path, dpi=110)
    return True


# ----------------------------------------------------------------------------- entry point
def write_report(run_dirs, out_dir=None, benchmark_files=()) -> Path:
    """Write the plots, `summary.md` and a self-contained `report.html`; return report.html.

    `out_dir` defaults to the first run folder's `report/`. Raises DDKError (one line) when a
    run folder or its metrics.jsonl is missing, or it holds no evaluation record.
    """
    runs = _load_runs(run_dirs)
    summary = _summarize(runs, tuple(read_benchmark_file(f) for f in benchmark_files))
    out = Path(out_dir) if out_dir is not None else runs[0].path / "report"
    _check_report_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DDKError(f"cannot create report folder '{out}': {e.strerror or e}") from None

    colors = _domain_colors(summary["domains"])
    _plot_perplexity(summary, runs, out / "perplexity_by_domain.png")
    _plot_ratios(summary, runs, colors, out / "ratio_over_training.png")
    _plot_weights(summary, runs, colors, out / "domain_weights.png")
    _plot_losses(summary, runs, out / "loss_curves.png")
    if not _plot_benchmarks(summary, out / "benchmarks_over_training.png"):
        (out / "benchmarks_over_training.png").unlink(missing_ok=True)  # a previous report's
    (out / "summary.md").write_text(_markdown(summary), encoding="utf-8")
    page = out / "report.html"
    page.write_text(_html(summary, out), encoding="utf-8")
    (out / REPORT_RECORD).write_text(json.dumps(ownership_record("report", REPORT_FILES), indent=2))
    print(f"report written to {page}")
    return page


REPORT_RECORD = ".ddk-report.json"
REPORT_FILES = [
    "perplexity_by_domain.png",
    "ratio_over_training.png",
    "domain_weights.png",
    "loss_curves.png",
    "benchmarks_over_training.png",
    "summary.md",
    "report.html",
]


def _check_report_folder(out: Path) -> None:
    """A report replaces only files a previous report wrote (listed in its record); the
    folder's other files stay as they are."""
    if out.exists() and not out.is_dir():
        raise DDKError(f"report folder '{out}' is a file; choose another --out")
    refuse_links(out, f"report folder '{out}'", [*REPORT_FILES, REPORT_RECORD])
    record_path = out / REPORT_RECORD
    record = read_record(record_path)
    owned = set(record["files"]) if is_owned(record, "report") else set()
    if record_path.exists() and not is_owned(record, "report"):
        clash = [REPORT_RECORD]
    else:
        clash = [f for f in REPORT_FILES if (out / f).exists() and f not in owned]
    if clash:
        raise DDKError(
            f"report folder '{out}' holds {clash[0]}, which ddk report did not write; ddk never "
            "overwrites it: choose another --out"
        )
    if owned:
        print(f"replacing the previous report in {out}")
