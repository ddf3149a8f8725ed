"""Methods x settings x seeds on any prepared data, teacher and student: the worst-domain ratio
and the geometric-mean perplexity on the test split, mean ± half-range over seeds, per setting.

    python benchmarks/method_sweep.py --out /tmp/sweep \
        --base /tmp/demo-0 /tmp/demo-1 /tmp/demo-2 \
        --settings paper equal kd floor_a25 log_floor robust \
        [--setting mine distill.method=ddk distill.alpha=0.3 ...] [--seeds 0 1 2] \
        [--tilt han30 han=0.30 python=0.17 ...] \
        [--set trainer.max_steps=500 ...] [--teacher T --student S --data D] \
        [--inprocess | --launcher "accelerate launch -m ddk.cli"] [--reference equal] \
        [--table-only]

A base is a run config (YAML) or a `ddk demo --out` folder (its configs/distill_*.yaml); each
base x trainer seed (`--seeds`; default: the base's own seed) is one replicate, a "seed" in the
table. `ddk demo --seed S` builds a corpus, tokenizer, teacher and student per seed, so its
folders are bases of their own. A setting is a named bundle of `--set` overrides applied over
the base (built-in: --list). `--tilt NAME DOMAIN=SHARE ...` is a static mixture: the named
domains get their shares of the samples and the others split the rest equally (DDK's loss,
`distill.method=kd` with that `distill.mixture`), to find what a fixed mixture can reach on the
data. Every run goes to OUT/runs/SETTING/REPLICATE through `ddk distill`
(a subprocess, or in this process with --inprocess), one at a time. Finished runs (a final_eval
record in metrics.jsonl) are skipped and interrupted ones resumed, so rerunning the same
command continues a sweep; a run folder whose config differs from what the command asks for
is refused. The numbers come from each run's final_eval record (the test split when the data
has one); the table is printed and written to OUT/results.md, every run's numbers to
OUT/results.json.

With --benchmarks (needs lm-eval), each base's data gets one lm-eval task per domain, built from
its held-out test documents as `ddk demo` builds its own (ddk.demo.tasks; written once to
OUT/tasks/), and every finished run whose final student has no score on them yet is scored
(RUN/sweep_benchmarks.json); the table gains each setting's benchmark average. It works with
--table-only too, so a finished sweep can be scored afterwards. A run scored in training (its
config's eval.tasks) keeps that score. The tasks are built from the corpus the data was prepared
from (found from the data's manifest; --corpus names it when it moved).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ddk.config import Config, load_config, read_raw_config
from ddk.errors import DDKError
from ddk.metrics import BENCHMARK_EVAL, FINAL_EVAL, read_metrics
from ddk.run_dir import flatten
from ddk.table import format_table

# Every steering key at the paper's value: built-in DDK settings start from these, so a
# setting means the same whatever the base config says.
PAPER_KEYS = [
    "distill.method=ddk",
    "distill.preset=null",
    "distill.alpha=0.5",
    "distill.init_floor=false",
    "distill.gap=ratio",
    "distill.clip_gap=false",
    "distill.weight_temperature=1.0",
    "distill.min_share=0.0",
    "distill.max_weight_change=null",
    "distill.gap_trend=0",
    "distill.prior_power=0.0",
    "distill.uniform_intervals=0",
    "distill.focus=all",
    "distill.natural_floor=null",
]


def describe(overrides: list[str]) -> str:
    """The overrides that matter: the last value of each key, less the paper's own values
    (the method always shows)."""
    last = {o.partition("=")[0]: o for o in overrides}
    return " ".join(o for k, o in last.items() if o not in PAPER_KEYS or k == "distill.method")


def _ddk(*changes: str) -> list[str]:
    return [*PAPER_KEYS, *changes]


SETTINGS: dict[str, list[str]] = {
    "paper": _ddk(),
    "no_smoothing": _ddk("distill.method=ddk_no_smoothing"),
    "equal": ["distill.method=equal"],
    "kd": ["distill.method=kd"],
    "cpt": ["distill.method=cpt"],
    "floor": _ddk("distill.init_floor=true"),
    "floor_a25": _ddk("distill.init_floor=true", "distill.alpha=0.25"),
    "a25": _ddk("distill.alpha=0.25"),
    "log": _ddk("distill.gap=log_ratio"),
    "log_floor": _ddk("distill.gap=log_ratio", "distill.init_floor=true"),
    "log_floor_a25": _ddk("distill.gap=log_ratio", "distill.init_floor=true", "distill.alpha=0.25"),
    "log_t2_floor": _ddk(
        "distill.gap=log_ratio", "distill.weight_temperature=2", "distill.init_floor=true"
    ),
    "log_clip_floor": _ddk(
        "distill.gap=log_ratio", "distill.clip_gap=true", "distill.init_floor=true"
    ),
    "log_t3_floor": _ddk(
        "distill.gap=log_ratio", "distill.weight_temperature=3", "distill.init_floor=true"
    ),
    "log_t4_floor": _ddk(
        "distill.gap=log_ratio", "distill.weight_temperature=4", "distill.init_floor=true"
    ),
    "log_t2_floor_a25": _ddk(
        "distill.gap=log_ratio",
        "distill.weight_temperature=2",
        "distill.init_floor=true",
        "distill.alpha=0.25",
    ),
    "log_t2_floor_min75": _ddk(
        "distill.gap=log_ratio",
        "distill.weight_temperature=2",
        "distill.init_floor=true",
        "distill.min_share=0.75",
    ),
    "log_t2_cap15": _ddk(
        "distill.gap=log_ratio", "distill.weight_temperature=2", "distill.max_weight_change=1.5"
    ),
    "log_cap15": _ddk("distill.gap=log_ratio", "distill.max_weight_change=1.5"),
    "log_floor_trend1": _ddk(
        "distill.gap=log_ratio", "distill.init_floor=true", "distill.gap_trend=1"
    ),
    "log_t2_floor_trend1": _ddk(
        "distill.gap=log_ratio",
        "distill.weight_temperature=2",
        "distill.init_floor=true",
        "distill.gap_trend=1",
    ),
    "log_t2_floor_trend2": _ddk(
        "distill.gap=log_ratio",
        "distill.weight_temperature=2",
        "distill.init_floor=true",
        "distill.gap_trend=2",
    ),
    "t10_floor": _ddk("distill.weight_temperature=10", "distill.init_floor=true"),
    "cap2": _ddk("distill.max_weight_change=2"),
    "log_cap2": _ddk("distill.gap=log_ratio", "distill.max_weight_change=2"),
    "floor_min75": _ddk("distill.init_floor=true", "distill.min_share=0.75"),
    "log_min75": _ddk("distill.gap=log_ratio", "distill.min_share=0.75"),
    "robust": _ddk("distill.preset=robust"),
    "focus": _ddk("distill.preset=focus"),
}


# ----------------------------------------------------------------------------- numbers
@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    short: str
    lower_is_better: bool
    judged: bool = True
    """Whether "beats the reference" asks for it (issue 19's bar: the two perplexity measures)."""


# Columns of the table; a column none of the runs has is left out. The benchmark average is
# shown, not judged: runs score it in training with an `eval.tasks` section, or afterwards with
# --benchmarks (lm-eval).
METRICS = (
    Metric("worst_ratio", "worst ratio S/T", "worst", True),
    Metric("geomean_ppl", "geo-mean ppl", "geo-mean", True),
    Metric("benchmark_avg", "benchmark avg %", "bench", False, judged=False),
)


def run_numbers(run_dir: Path) -> dict | None:
    """The final evaluation of one run folder, or None while it has none: {"split",
    "worst_ratio", "worst_domain", "geomean_ppl", "ppl": {domain: ppl}, "ratio": {...},
    "benchmark_avg": the final model's lm-eval average in percent (from training, else from
    RUN/sweep_benchmarks.json), or None}.
    A NaN ratio or perplexity (a diverged domain) makes the run's worst ratio / mean NaN."""
    path = run_dir / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    finals = [r for r in records if r.get("event") == FINAL_EVAL]
    if not finals:
        return None
    scored = [r for r in records if r.get("event") == BENCHMARK_EVAL and r.get("final")]
    average = scored[-1].get("average") if scored else None  # None too when scoring failed
    if average is None and (run_dir / SWEEP_BENCHMARKS).is_file():  # scored by --benchmarks
        average = json.loads((run_dir / SWEEP_BENCHMARKS).read_text()).get("average")
    domains = finals[-1]["domains"]  # a resumed run may repeat it; the last one stands
    ppl = {d: float(e["student_ppl"]) for d, e in domains.items()}
    ratio = {
        d: float(e["ratio"]) if e.get("ratio") is not None else ppl[d] / float(e["teacher_ppl"])
        for d, e in domains.items()
        if e.get("ratio") is not None or e.get("teacher_ppl")
    }
    worst = max(ratio, key=lambda d: math.inf if math.isnan(ratio[d]) else ratio[d], default=None)
    logs = [math.log(v) if v > 0 else math.nan for v in ppl.values()]
    return {
        "split": finals[-1].get("split", "val"),
        "worst_domain": worst,
        "worst_ratio": ratio[worst] if worst is not None else None,
        "geomean_ppl": math.exp(sum(logs) / len(logs)) if logs else None,
        "ppl": ppl,
        "ratio": ratio,
        "benchmark_avg": 100 * average if average is not None else None,
    }


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the max-min range."""
    return statistics.mean(values), (max(values) - min(values)) / 2


def summarize(results: dict[str, dict[str, dict]], reference: str | None) -> list[dict]:
    """Per setting (in the given order): n, per-metric mean/half-range/per-replicate values,
    and against `reference` (a setting name): the mean's relative change per metric and in how
    many shared replicates the setting is better on every metric at once (ties count for the
    second metric on: 'at or below')."""
    ref = results.get(reference) if reference else None
    rows = []
    for setting, by_rep in results.items():
        reps = sorted(by_rep)
        row: dict = {"setting": setting, "replicates": reps, "n": len(reps), "metrics": {}}
        for m in METRICS:
            values = [by_rep[r][m.key] for r in reps if by_rep[r].get(m.key) is not None]
            if not values:
                continue
            mean, half = spread(values)
            row["metrics"][m.key] = {"mean": mean, "half_range": half, "values": values}
        if ref and setting != reference and reps:
            shared = [r for r in reps if r in ref]
            row["vs_reference"] = _against(by_rep, ref, shared, row["metrics"], ref)
        rows.append(row)
    return rows


def _better(mine: float, ref: float, metric: Metric, strict: bool) -> bool:
    a, b = (mine, ref) if metric.lower_is_better else (-mine, -ref)
    return a < b if strict else a <= b


def _better_on_all(mine: dict, ref: dict, metrics) -> bool:
    """Issue 19's bar: strictly better on the first metric (the worst ratio), at least as good
    on the others (the mean)."""
    return all(_better(mine[m.key], ref[m.key], m, strict=i == 0) for i, m in enumerate(metrics))


def _against(mine: dict, ref: dict, shared: list[str], metrics: dict, ref_runs: dict) -> dict:
    judged = [m for m in METRICS if m.judged and m.key in metrics and
              all(ref[r].get(m.key) is not None for r in shared)]  # fmt: skip
    ref_means = (
        {m.key: statistics.mean(ref[r][m.key] for r in shared) for m in judged} if shared else {}
    )
    my_means = {m.key: metrics[m.key]["mean"] for m in judged}
    return {
        "change": {k: my_means[k] / v - 1 if v else None for k, v in ref_means.items()},
        "wins": sum(_better_on_all(mine[r], ref[r], judged) for r in shared),
        "shared": len(shared),
        "both_means": bool(ref_means) and _better_on_all(my_means, ref_means, judged),
    }


def table(rows: list[dict], reference: str | None, markdown: bool = False) -> str:
    metrics = [m for m in METRICS if any(m.key in r["metrics"] for r in rows)]
    headers = ["setting", "seeds"]
    headers += [m.title for m in metrics]
    headers += [f"{metrics[0].short} per seed"] if metrics else []
    if reference and any("vs_reference" in r for r in rows):
        headers += [f"Δ {m.short} vs {reference}" for m in metrics if m.judged]
        headers += [f"beats {reference} (seeds)"]
    lines = []
    for r in rows:
        line = [r["setting"], r["n"]]
        for m in metrics:
            s = r["metrics"].get(m.key)
            line.append(f"{s['mean']:.2f} ± {s['half_range']:.2f}" if s else "")
        if metrics:
            first = r["metrics"].get(metrics[0].key)
            line.append(", ".join(f"{v:.2f}" for v in first["values"]) if first else "")
        if reference and any("vs_reference" in x for x in rows):
            vs = r.get("vs_reference")
            for m in (m for m in metrics if m.judged):
                c = vs["change"].get(m.key) if vs else None
                line.append(f"{c:+.1%}" if c is not None else "")
            line.append(f"{'yes' if vs['both_means'] else 'no'} ({vs['wins']}/{vs['shared']})"
                        if vs else "(reference)" if r["setting"] == reference else "")  # fmt: skip
        lines.append(line)
    return format_table(headers, lines, markdown=markdown)


# ----------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Replicate:
    label: str
    base: Path | None
    seed: int | None


@dataclass(frozen=True)
class Run:
    setting: str
    replicate: Replicate
    run_dir: Path
    config_path: Path
    overrides: tuple[str, ...]


def base_config(path: str | Path) -> Path:
    """A YAML file, or a `ddk demo --out` folder: its configs/distill_ddk.yaml (else the only
    distill_*.yaml there)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    configs = p / "configs"
    if (configs / "distill_ddk.yaml").is_file():
        return configs / "distill_ddk.yaml"
    found = sorted(configs.glob("distill_*.yaml"))
    if not found:
        raise DDKError(f"base '{p}' is neither a config file nor a demo folder with configs/")
    return found[0]


def replicates(bases: list[str], seeds: list[int] | None) -> list[Replicate]:
    out = []
    paths = [Path(b).expanduser() for b in bases]
    names = [(p.stem if p.is_file() else p.name) or str(p) for p in paths]
    for i, (base, name) in enumerate(zip(bases or [None], names or ["run"])):
        label = name if names.count(name) == 1 else f"{name}-{i}"
        path = base_config(base) if base is not None else None
        for seed in seeds or [None]:
            out.append(Replicate(label if seed is None else f"{label}.seed{seed}", path, seed))
    return out


def plan(out: Path, settings: dict[str, list[str]], reps: list[Replicate], common: list[str]):
    runs = []
    for name, overrides in settings.items():
        for rep in reps:
            run_dir = out / "runs" / name / rep.label
            extra = [f"trainer.seed={rep.seed}"] if rep.seed is not None else []
            full = (*common, *overrides, *extra, f"trainer.output_dir={run_dir}")
            runs.append(Run(name, rep, run_dir, out / "configs" / name / f"{rep.label}.yaml", full))
    return runs


def requested_config(run: Run) -> Config:
    return load_config(run.replicate.base, list(run.overrides))


def _comparable(config: dict) -> dict:
    flat = flatten(config)
    flat.pop("trainer.output_dir", None)
    return {k: v for k, v in flat.items() if not k.startswith("prepare.")}


def check_same_run(run: Run, cfg: Config) -> None:
    saved = run.run_dir / "config.yaml"
    if not saved.is_file():
        return
    # a key the saved config lacks is newer than the run, which ran with its default
    had = {**_comparable(Config().model_dump(mode="json")), **_comparable(read_raw_config(saved))}
    want = _comparable(cfg.model_dump(mode="json"))
    diff = sorted(k for k in want if had.get(k) != want[k])
    if diff:
        raise DDKError(
            f"'{run.run_dir}' holds a run of setting '{run.setting}' made with other values of "
            f"{', '.join(diff)}; remove that folder or use another --out"
        )


def execute(run: Run, launcher: list[str] | None, log_dir: Path) -> None:
    """One run through `ddk distill` (new, or --resume when its folder holds a started run)."""
    cfg = requested_config(run)
    check_same_run(run, cfg)
    run.config_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.save(run.config_path)
    started = run.run_dir.is_dir() and any(run.run_dir.iterdir())
    if launcher is None:
        from ddk.preflight import load_checked_config
        from ddk.run_dir import resume_run, start_run

        done = (
            resume_run(run.run_dir)
            if started
            else start_run(load_checked_config(run.config_path, []))
        )
        if done is None:
            raise KeyboardInterrupt
        return
    argv = [
        *launcher,
        "distill",
        *(["--resume", str(run.run_dir)] if started else [str(run.config_path)]),
    ]
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{run.setting}__{run.replicate.label}.log"
    with open(log, "a") as fh:
        fh.write(f"$ {shlex.join(argv)}\n")
        fh.flush()
        code = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise DDKError(f"run '{run.run_dir}' failed (exit {code}); see {log}")


def sweep(runs: list[Run], launcher: list[str] | None, log_dir: Path, say: Callable = print):
    for run in runs:  # every folder first: a finished run made with other values is refused too
        check_same_run(run, requested_config(run))
    todo = [r for r in runs if run_numbers(r.run_dir) is None]
    say(f"{len(runs) - len(todo)} of {len(runs)} runs finished already; {len(todo)} to go")
    for i, run in enumerate(todo, 1):
        say(f"[{i}/{len(todo)}] {run.setting} on {run.replicate.label} -> {run.run_dir}")
        execute(run, launcher, log_dir)


def collect(runs: list[Run]) -> dict[str, dict[str, dict]]:
    results: dict[str, dict[str, dict]] = {}
    for run in runs:
        numbers = run_numbers(run.run_dir)
        results.setdefault(run.setting, {})
        if numbers is not None:
            check_same_run(run, requested_config(run))
        if numbers is not None:
            results[run.setting][run.replicate.label] = numbers
    return results


def write_results(out: Path, rows, results: dict, settings: dict, reference: str | None, note):
    command = shlex.join(["python", "benchmarks/method_sweep.py", *sys.argv[1:]])
    md = [f"# command: {command}", "", note, "", table(rows, reference, markdown=True), ""]
    md += ["Settings:", ""]
    md += [f"- `{name}`: `{describe(list(overrides))}`" for name, overrides in settings.items()]
    md += [""]
    per_domain = sorted(
        {d for by_rep in results.values() for n in by_rep.values() for d in n["ratio"]}
    )
    if per_domain:
        md += ["Ratio S/T per domain (mean over seeds):", ""]
        lines = []
        for setting, by_rep in results.items():
            if by_rep:
                lines.append([setting] + [statistics.mean(n["ratio"][d] for n in by_rep.values()
                             if d in n["ratio"]) for d in per_domain])  # fmt: skip
        md += [format_table(["setting", *per_domain], lines, markdown=True), ""]
    (out / "results.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps({"summary": rows, "runs": results}, indent=2))


# ----------------------------------------------------------------------------- benchmarks
SWEEP_BENCHMARKS = "sweep_benchmarks.json"  # a finished run's final student, scored afterwards


def corpus_of(prepared: Path) -> Path:
    """The corpus `prepared` was made from: the folder (or file) above its manifest's sources
    that `ddk prepare` would read as exactly those sources."""
    from ddk.data.manifest import read_manifest
    from ddk.data.sources import discover

    sources = {Path(s["path"]) for s in read_manifest(prepared).sources}
    if sources and all(p.is_file() for p in sources):
        top = Path(os.path.commonpath(sorted(sources)))
        for candidate in (top, *top.parents[:2]):
            try:
                found = {f.path for f in discover(candidate).files}
            except DDKError:
                continue
            if found == sources:
                return candidate
    raise DDKError(
        f"the corpus '{prepared}' was prepared from is not where its manifest says; give it "
        "with --corpus (the benchmark tasks are built from its test documents)"
    )


def build_tasks(out: Path, prepared: Path, corpus: Path | None) -> tuple[dict, Path]:
    """One lm-eval task per domain of `prepared`, from its test documents, in OUT/tasks/<data>
    (built once per data folder; every setting and seed is scored on the same items)."""
    from ddk.demo.tasks import write_demo_tasks

    prepared = prepared.resolve()
    digest = hashlib.sha1(str(prepared).encode()).hexdigest()[:8]
    folder = out / "tasks" / f"{prepared.parent.name}-{prepared.name}-{digest}"
    index = folder / "tasks.json"
    if index.is_file():
        return json.loads(index.read_text()), folder
    tasks = write_demo_tasks(prepared, corpus or corpus_of(prepared), folder, seed=0)
    index.write_text(json.dumps(tasks, indent=2))
    return tasks, folder


def _scored_on(run_dir: Path, numbers: dict, folder: Path) -> bool:
    """Whether the run's final student (its `run_numbers`) has a score (or a failure) on these
    tasks, or one from training (on its own config's tasks: not comparable with the others')."""
    saved = run_dir / SWEEP_BENCHMARKS
    if saved.is_file():
        return json.loads(saved.read_text()).get("task_folder") == str(folder.resolve())
    return numbers.get("benchmark_avg") is not None


def score_finished(runs: list[Run], out: Path, corpus: Path | None, say: Callable = print):
    """Score every finished run's final student on its data's tasks, unless it has a score."""
    from ddk.config import EvalSection
    from ddk.harness import BenchmarkPlan, benchmarks_payload, score_or_failure, write_benchmarks
    from ddk.models import eval_model, eval_tokenizer

    tasks_of: dict[Path, tuple[dict, Path]] = {}  # per data folder
    for run in runs:
        numbers = run_numbers(run.run_dir)
        if numbers is None:  # not finished
            continue
        data = Path(requested_config(run).data.prepared)
        if data not in tasks_of:
            tasks_of[data] = build_tasks(out, data, corpus)
        tasks, folder = tasks_of[data]
        if _scored_on(run.run_dir, numbers, folder):
            continue
        say(f"benchmarks: {run.setting} on {run.replicate.label}")
        final = str(run.run_dir / "final")
        section = EvalSection(tasks=tasks, include_path=[str(folder.resolve())])
        plan = BenchmarkPlan.from_section(section)
        # a failure is recorded (no average) and the sweep goes on to the next run
        record = score_or_failure(eval_model(final), eval_tokenizer(final), plan)
        payload = benchmarks_payload(final, record, task_folder=str(folder.resolve()))
        write_benchmarks(run.run_dir / SWEEP_BENCHMARKS, payload)


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=False, help="sweep folder (runs, configs, logs, results)")
    p.add_argument("--base", nargs="+", default=[], help="config YAMLs or `ddk demo` folders")
    p.add_argument("--seeds", type=int, nargs="+", help="trainer.seed values per base")
    p.add_argument("--settings", nargs="+", default=[], help="built-in settings (see --list)")
    p.add_argument("--setting", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                   help="a setting of your own: a name and its --set overrides")  # fmt: skip
    p.add_argument("--tilt", nargs="+", action="append", default=[],
                   metavar="NAME DOMAIN=SHARE",
                   help="a static mixture: the named domains' shares, the rest split equally")  # fmt: skip
    p.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run (e.g. trainer.max_steps=500)")  # fmt: skip
    p.add_argument("--teacher", help="= --set model.teacher=...")
    p.add_argument("--student", help="= --set model.student=...")
    p.add_argument("--data", help="= --set data.prepared=...")
    p.add_argument("--reference", default="equal", help="setting to compare against ('' = none)")
    p.add_argument("--inprocess", action="store_true", help="run in this process, not `ddk`")
    p.add_argument("--launcher", default=None,
                   help="command that takes ddk's arguments (default: this Python -m ddk.cli)")  # fmt: skip
    p.add_argument("--table-only", action="store_true", help="run nothing; tabulate what is done")
    p.add_argument("--benchmarks", action="store_true",
                   help="score each finished run's final student on lm-eval tasks built from "
                   "the data's test documents (needs lm-eval)")  # fmt: skip
    p.add_argument("--corpus", help="with --benchmarks: the corpus the data was prepared from, "
                   "when it moved (one corpus for every base)")  # fmt: skip
    p.add_argument("--list", action="store_true", help="print the built-in settings and exit")
    args = p.parse_args(argv)
    if not args.list and not args.out:
        p.error("--out is required")
    return args


def chosen_settings(args, domains: Callable[[], list[str]]) -> dict[str, list[str]]:
    """The settings asked for, by name; `domains` (read only for --tilt) lists the data's."""
    settings: dict[str, list[str]] = {}

    def add(flag: str, name: str, overrides: list[str]) -> None:
        if flag != "--settings" and ("=" in name or "/" in name):
            raise DDKError(f"{flag} needs a name first, then its pairs; got '{name}'")
        if name in settings:
            raise DDKError(f"setting '{name}' is asked for twice; give each setting its own name")
        settings[name] = overrides

    for name in args.settings:
        if name not in SETTINGS:
            raise DDKError(f"unknown setting '{name}'; built-in: {', '.join(SETTINGS)}")
        add("--settings", name, SETTINGS[name])
    for name, *overrides in args.setting:
        add("--setting", name, overrides)
    for name, *shares in args.tilt:
        add("--tilt", name, tilt_setting(name, shares, domains()))
    if not settings:
        raise DDKError(
            "no settings: give --settings NAME ..., --setting NAME KEY=VALUE ... or "
            "--tilt NAME DOMAIN=SHARE ..."
        )
    return settings


def data_domains(bases: list[str], common: list[str]) -> list[str]:
    """The domains of the prepared data every base trains on (the same in each)."""
    from ddk.data.manifest import read_manifest

    found = []
    for base in bases or [None]:
        prepared = load_config(base and base_config(base), common).data.prepared
        if not prepared:
            raise DDKError("--tilt needs the data: give --data or a base with data.prepared")
        found.append(list(read_manifest(prepared).domains))
    if any(f != found[0] for f in found):
        raise DDKError(f"--tilt needs one set of domains; the bases' data have {found}")
    return found[0]


def tilt_setting(name: str, shares: list[str], domains: list[str]) -> list[str]:
    """`DOMAIN=SHARE ...` as the overrides of a static mixture: those domains get their shares,
    every other domain an equal part of the rest."""
    given: dict[str, float] = {}
    for item in shares:
        domain, _, value = item.partition("=")
        if domain not in domains:
            raise DDKError(
                f"--tilt {name}: '{domain}' is not a domain of the data ({', '.join(domains)})"
            )
        if domain in given:
            raise DDKError(f"--tilt {name}: '{domain}' is given twice")
        try:
            given[domain] = float(value)
        except ValueError:
            given[domain] = math.nan
        if not 0 < given[domain] < 1:  # NaN fails too
            raise DDKError(f"--tilt {name} {item}: give DOMAIN=SHARE, a share in (0, 1)")
    rest = [d for d in domains if d not in given]
    left = 1 - sum(given.values())
    if not given:
        raise DDKError(f"--tilt {name}: name at least one domain with its share (DOMAIN=SHARE)")
    if not rest:
        raise DDKError(f"--tilt {name}: leave at least one domain out; it shares the rest")
    if left < 1e-6:
        raise DDKError(
            f"--tilt {name}: the shares sum to {1 - left:g}; keep them below 1 so the other "
            "domains get the rest"
        )
    # the given shares as given; the rest rounded only to drop float noise (0.53 / 5)
    mixture = {d: given[d] if d in given else round(left / len(rest), 12) for d in domains}
    return ["distill.method=kd", f"distill.mixture={json.dumps(mixture, separators=(',', ':'))}"]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, overrides in SETTINGS.items():
            print(f"{name:16s} {describe(overrides)}")
        return 0
    out = Path(args.out).expanduser()
    common = list(args.common)
    for key, value in (("model.teacher", args.teacher), ("model.student", args.student),
                       ("data.prepared", args.data)):  # fmt: skip
        if value:
            common.append(f"{key}={value}")
    settings = chosen_settings(args, functools.cache(lambda: data_domains(args.base, common)))
    reps = replicates(args.base, args.seeds)
    runs = plan(out, settings, reps, common)
    reference = args.reference if args.reference in settings else None
    if not args.table_only:
        from ddk.lock import FolderLock

        out.mkdir(parents=True, exist_ok=True)
        launcher = None if args.inprocess else shlex.split(args.launcher or "") or [
            sys.executable, "-m", "ddk.cli"]  # fmt: skip
        with FolderLock(out, "another sweep uses this --out"):
            sweep(runs, launcher, out / "logs")
    if args.benchmarks:
        from ddk.harness.tasks import require_lm_eval
        from ddk.lock import FolderLock

        require_lm_eval()
        corpus = Path(args.corpus).expanduser() if args.corpus else None
        out.mkdir(parents=True, exist_ok=True)
        with FolderLock(out, "another sweep uses this --out"):
            score_finished(runs, out, corpus)
    results = collect(runs)
    rows = summarize(results, reference)
    splits = sorted({n["split"] for by_rep in results.values() for n in by_rep.values()})
    note = (
        f"{len(reps)} seeds ({', '.join(r.label for r in reps)}); numbers on the "
        f"{'/'.join(splits) or '?'} split"
        + (" (held out: nothing steered by it)" if splits == ["test"] else "")
        + "; mean ± half the max-min range over seeds; Δ: change of the mean against "
        + (
            f"'{reference}'; beats: a lower {METRICS[0].short} and a {METRICS[1].short} at or "
            f"below {reference}'s, on the means (and in how many seeds)."
            if reference
            else "none."
        )
    )
    print("\n" + note)
    print(table(rows, reference))
    if out.is_dir():
        write_results(out, rows, results, settings, reference, note)
        print(f"\nwritten: {out / 'results.md'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DDKError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
