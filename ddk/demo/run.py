"""`ddk demo`: the whole pipeline on this machine, nothing downloaded.

    corpus (stdlib code, docs prose, generated math and records)  -> BPE tokenizer
    -> teacher: a small Llama pre-trained on the natural mix      (cached)
    -> student: a smaller Llama pre-trained briefly on a skewed mix (cached; it lags unevenly,
       as real small models do, which is where DDK has something to steer)
    -> ddk prepare -> ddk distill with cpt, kd, ddk and equal at equal tokens and seed -> report.
With lm-eval installed (`pip install -e '.[eval]'`), one benchmark task per domain is built from
its held-out test documents (ddk.demo.tasks); the teacher, the student before and every run's
final student are scored on them (inside `ddk distill`, through eval.tasks) beside perplexity.
Every stage runs through the same code (and config schema) a user's run takes; each stage's
config is written to OUT/configs/ as a YAML to copy for one's own models and data.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from ddk.commands.eval_model import eval_model, eval_tokenizer
from ddk.config import Config, PrepareSection, load_config
from ddk.data.prepare import prepare
from ddk.demo import crosstok
from ddk.demo.build import tiny_causal_lm, train_bpe_tokenizer
from ddk.demo.corpus import build_demo_corpus
from ddk.demo.tasks import write_demo_tasks
from ddk.errors import DDKError
from ddk.harness import LM_EVAL_EXTRA, BenchmarkPlan, benchmarks_payload, score, write_benchmarks
from ddk.lock import FolderLock
from ddk.methods import METHODS
from ddk.ownership import check_replaceable, list_files, ownership_record, read_record
from ddk.report import benchmark_table, summarize_runs, write_report
from ddk.run_dir import start_run
from ddk.table import format_table


@dataclass(frozen=True)
class DemoSize:
    scale: float
    vocab: int
    seq_len: int
    val_sequences: int
    teacher_steps: int
    student_steps: int
    distill_steps: int
    K: int
    batch: int


FULL = DemoSize(
    scale=1.0,
    vocab=2048,
    seq_len=128,
    val_sequences=24,
    teacher_steps=700,
    student_steps=150,
    distill_steps=300,
    K=30,
    batch=16,
)
QUICK = DemoSize(
    scale=0.35,
    vocab=1024,
    seq_len=64,
    val_sequences=16,
    teacher_steps=500,
    student_steps=80,
    distill_steps=240,
    K=20,
    batch=16,
)
# Wall time measured on a 2-core CPU machine, by (quick, teacher and student cached).
ESTIMATE = {
    (False, False): "about 5-7 minutes",
    (False, True): "about 2 minutes",
    (True, False): "about 1-2 minutes",
    (True, True): "about a minute",
}
TEACHER = {"hidden_size": 128, "num_layers": 4, "num_heads": 4}
STUDENT = {"hidden_size": 64, "num_layers": 2, "num_heads": 2}
# The student's pre-training mix: mostly prose, little of the rest, none of math.
STUDENT_MIX = {"prose": 0.8, "records": 0.15, "code": 0.05, "math": 0.0}


def _stage(msg: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)


def _common_trainer(size: DemoSize, steps: int, out_dir: Path, lr: float, seed: int) -> list[str]:
    return [
        f"trainer.output_dir={out_dir}",
        f"trainer.max_steps={steps}",
        f"trainer.micro_batch_size={size.batch}",
        f"trainer.lr={lr}",
        f"trainer.min_lr={lr / 10}",
        f"trainer.warmup_steps={max(1, steps // 20)}",
        f"trainer.log_every={max(1, steps // 30)}",
        f"trainer.save_every={steps}",
        "trainer.keep_checkpoints=1",
        "trainer.eval_batch_size=16",
        "trainer.weight_decay=0.0",
        f"trainer.seed={seed}",
    ]


def _finished(final: Path | None) -> Path:
    """A stage stopped by Ctrl-C/SIGTERM ends the demo (the next stages need its output)."""
    if final is None:
        raise KeyboardInterrupt
    return final


def _pretrain(
    base_model: Path,
    data: Path,
    run_dir: Path,
    size: DemoSize,
    steps: int,
    mixture,
    lr: float,
    seed: int,
    configs: Path,
    name: str,
) -> Path:
    """Pre-train with the `cpt` method (CE only): the same trainer a user's run takes."""
    overrides = [
        f"model.student={base_model}",
        f"data.prepared={data}",
        "distill.method=cpt",
        f"distill.K={steps}",
        f"distill.mixture={json.dumps(mixture)}",
        *_common_trainer(size, steps, run_dir, lr, seed),
    ]
    cfg = load_config(None, overrides)
    cfg.save(configs / f"{name}.yaml")
    return _finished(start_run(cfg))


def _models(cache: Path, corpus: Path, data: Path, size: DemoSize, seed: int, configs: Path, t0):
    """Tokenizer, teacher and student base: built once, cached, reused by later runs."""
    tok_dir = cache / "tokenizer"
    teacher = cache / "teacher" / "final"
    student = cache / "student" / "final"
    if teacher.exists() and student.exists():
        _stage(f"using cached teacher and student in {cache}", t0)
        return tok_dir, teacher, student
    tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    for name, shape, steps, mix, lr in (
        ("teacher", TEACHER, size.teacher_steps, "natural", 3e-3),
        ("student", STUDENT, size.student_steps, STUDENT_MIX, 3e-3),
    ):
        init = cache / f"{name}-init"
        model = tiny_causal_lm(len(tok), max_positions=size.seq_len, seed=seed + len(name), **shape)
        model.save_pretrained(init)
        tok.save_pretrained(init)
        n_params = sum(p.numel() for p in model.parameters())
        _stage(f"pre-training the {name} ({n_params / 1e6:.2f}M parameters, {steps} steps)", t0)
        run_dir = cache / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        _pretrain(init, data, run_dir, size, steps, mix, lr, seed, configs, f"pretrain_{name}")
    return tok_dir, teacher, student


def _prepare_all(
    cache: Path, out: Path, size: DemoSize, seed: int, configs: Path, t0, byte_spans: bool = False
):
    corpus = out / "corpus"
    stats = build_demo_corpus(corpus, scale=size.scale, seed=seed)
    sizes = ", ".join(f"{d} {s['bytes'] / 1e6:.2f} MB" for d, s in stats.items())
    _stage(f"corpus built in {corpus}: {sizes}", t0)
    tok_dir = cache / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():

        def texts():
            for f in sorted(corpus.glob("*/*.jsonl")):
                for line in f.open():
                    yield json.loads(line)["text"]

        train_bpe_tokenizer(texts(), size.vocab, tok_dir)
        _stage(f"trained a {size.vocab}-token BPE tokenizer", t0)
    cfg = Config(
        prepare=PrepareSection(
            input=str(corpus),
            output=str(out / "prepared"),
            tokenizer=str(tok_dir),
            seq_len=size.seq_len,
            val_sequences=size.val_sequences,
            seed=seed,
            overwrite=True,  # the demo owns OUT/prepared; a --quick run may have left another size
            byte_spans=byte_spans,  # a cross-tokenizer teacher reads the text
        )
    )
    cfg.save(configs / "prepare.yaml")
    prepare(cfg.prepare, str(tok_dir), trust_remote_code=False)  # the demo's own tokenizer
    return corpus, out / "prepared"


def distill_stage(
    method: str,
    teacher: Path,
    student: Path,
    data: Path,
    out: Path,
    size: DemoSize,
    steps: int,
    seed: int,
    configs: Path,
    benchmarks: list[str] = (),
    extra: list[str] = (),
) -> Path:
    run_dir = out / "runs" / method
    if run_dir.exists():
        shutil.rmtree(run_dir)
    base, variant = split_variant(method.partition(crosstok.SUFFIX)[0])
    overrides = [
        f"model.teacher={teacher}",
        f"model.student={student}",
        f"data.prepared={data}",
        f"distill.method={base}",
        f"distill.K={size.K}",
        *_common_trainer(size, steps, run_dir, 1e-3, seed),
        *benchmarks,
        *extra,
    ]
    if variant == "floor":
        overrides.append("distill.init_floor=true")
    cfg = load_config(None, overrides)
    cfg.save(configs / f"distill_{method}.yaml")
    _finished(start_run(cfg))
    return run_dir


def demo_benchmarks(corpus: Path, data: Path, out: Path, seed: int, t0) -> list[str]:
    """The eval.* overrides of every distill run: one lm-eval task per domain, built from its
    held-out test documents; none (and one line) without lm-eval."""
    if importlib.util.find_spec("lm_eval") is None:
        print(f"lm-eval is not installed: no benchmark scores in this demo ({LM_EVAL_EXTRA})")
        return []
    folder = out / "tasks"
    tasks = write_demo_tasks(data, corpus, folder, seed)
    _stage(f"built one benchmark task per domain from its test documents in {folder}", t0)
    return [
        f"eval.tasks={json.dumps(tasks)}",
        f"eval.include_path={json.dumps([str(folder.resolve())])}",
        f"eval.batch_size={BENCHMARK_BATCH}",
    ]


BENCHMARK_BATCH = 32


def score_references(models: dict[str, Path], benchmarks: list[str], out: Path, t0) -> list[Path]:
    """`ddk eval --out` files of the models every run is compared with (the teacher, the
    student before distillation): rows above the runs in the benchmark table."""
    if not benchmarks:
        return []
    plan = BenchmarkPlan.from_section(load_config(None, benchmarks).eval)
    files = []
    for label, folder in models.items():
        _stage(f"scoring the {label} on the benchmark tasks", t0)
        record = score(eval_model(str(folder)), eval_tokenizer(str(folder)), plan)
        path = out / "benchmarks" / f"{label.replace(' ', '_')}.json"
        path.parent.mkdir(exist_ok=True)
        write_benchmarks(path, benchmarks_payload(label, record))
        files.append(path)
    return files


VARIANTS = {"": "the method as configured", "floor": "distill.init_floor=true (ddk only)"}


def _cross_stage(args, out, cache, corpus, data, models, size, steps, runs, t0) -> str:
    """`--cross-teacher` (`ddk.demo.crosstok`): teacher-x with its own tokenizer, kd@x and
    ddk@x through it, and every model's test perplexity per byte; returns results.md's part."""
    configs = out / "configs"
    tok_x = crosstok.second_tokenizer(cache, corpus, size.vocab)
    teacher_x = cache / "teacher-x" / "final"
    if not teacher_x.exists():
        data_x = crosstok.prepare_in(tok_x, corpus, out / "prepared-x", 2 * size.seq_len,
                                     size.val_sequences, args.seed)  # fmt: skip
        tok = AutoTokenizer.from_pretrained(tok_x)
        init = cache / "teacher-x-init"
        tiny_causal_lm(len(tok), max_positions=4 * size.seq_len, seed=args.seed + 7,
                       **TEACHER).save_pretrained(init)  # fmt: skip
        tok.save_pretrained(init)
        _stage(
            f"pre-training teacher-x ({len(tok)}-token tokenizer, {size.teacher_steps} steps)", t0
        )
        _pretrain(init, data_x, cache / "teacher-x", size, size.teacher_steps, "natural", 3e-3,
                  args.seed, configs, "pretrain_teacher_x")  # fmt: skip
    cross_runs = []
    for method in args.cross_methods:
        label, extra = crosstok.cross_method(method)
        _stage(f"distilling with {label} (teacher-x, {steps} steps)", t0)
        cross_runs.append(distill_stage(label, teacher_x, models["student before"], data, out,
                                        size, steps, args.seed, configs, extra=extra))  # fmt: skip
    ppl = crosstok.byte_perplexities(models, runs + cross_runs, data, teacher_x)
    (out / "cross_results.json").write_text(json.dumps(ppl, indent=2))
    return (
        "\nTest perplexity PER BYTE (total NLL / UTF-8 bytes of the same texts; comparable "
        "across tokenizers). teacher-x has its own tokenizer; @x runs distilled through it.\n\n"
        "```\n" + crosstok.byte_table(ppl) + "\n```\n"
    )


def split_variant(label: str) -> tuple[str, str]:
    """'ddk+floor' -> ('ddk', 'floor'): a method plus an opt-in variant, as the report labels it."""
    base, _, variant = label.partition("+")
    if base not in METHODS or variant not in VARIANTS or (variant and base != "ddk"):
        raise DDKError(
            f"demo method '{label}' is unknown; use one of {', '.join(METHODS)} or ddk+floor"
        )
    return base, variant


def demo_table(summary: dict) -> str:
    """Per-domain perplexity: teacher, student before, each method after; mean and worst."""
    runs = summary["runs"]
    domains = list(summary["teacher"])
    headers = ["domain", "teacher", "student before"] + [r["label"] for r in runs]
    rows = []
    for d in domains:
        rows.append([d, summary["teacher"][d], summary["before"][d]] + [r["ppl"][d] for r in runs])

    def geo(values):
        return math.exp(sum(math.log(v) for v in values) / len(values))

    rows.append(
        ["geometric mean", geo(summary["teacher"].values()), geo(summary["before"].values())]
        + [geo(r["ppl"].values()) for r in runs]
    )
    before_ratio = {d: summary["before"][d] / summary["teacher"][d] for d in domains}
    worst_before = max(before_ratio, key=before_ratio.get)
    rows.append(
        ["worst ratio S/T", 1.0, f"{before_ratio[worst_before]:.3f} ({worst_before})"]
        + [f"{r['worst_ratio']:.3f} ({r['worst_domain']})" for r in runs]
    )
    return format_table(headers, rows)


def results_text(summary: dict) -> str:
    """results.md: the perplexity table, then (when scored) the benchmark table."""
    caption = (
        f"Perplexity per domain on the {summary['split']} split (lower is better; "
        + ("held out, nothing was tuned on it" if summary["split"] == "test" else "no test split")
        + "); worst ratio = largest student/teacher perplexity ratio."
    )
    text = caption + "\n\n```\n" + demo_table(summary) + "\n```\n"
    benchmarks = benchmark_table(summary)
    if benchmarks is not None:
        text += (
            "\nBenchmark accuracy in percent (higher is better; lm-eval's acc_mutual_info on "
            "one next-unit multiple-choice task per domain, built from its held-out test "
            "documents; tasks/ holds them):\n\n```\n" + format_table(*benchmarks) + "\n```\n"
        )
    return text


def run_demo(args) -> dict:
    size = QUICK if args.quick else FULL
    changes = {
        "scale": args.scale,
        "teacher_steps": args.teacher_steps,
        "student_steps": args.student_steps,
    }
    size = DemoSize(**{**size.__dict__, **{k: v for k, v in changes.items() if v is not None}})
    steps = args.steps or size.distill_steps
    methods = list(args.methods) + (
        ["ddk+floor"] if getattr(args, "init_floor_variant", False) else []
    )
    methods = list(dict.fromkeys(methods))
    for m in methods:
        split_variant(m)  # refuse a typo before minutes of corpus building
    t0 = time.perf_counter()
    out = Path(args.out).expanduser()
    replacing = check_demo_folder(out)
    with FolderLock(out, "use another --out"):
        try:
            if replacing:
                print(f"replacing the previous demo in {out} (only the files it wrote)")
            return _run_stages(args, out, size, steps, t0, methods)
        finally:
            write_demo_record(out)


DEMO_RECORD = ".ddk-demo.json"


def check_demo_folder(out: Path) -> bool:
    """Refuse (one line) unless OUT is new, empty, or holds only what a previous demo wrote;
    True when there is a previous demo to replace."""
    record = read_record(out / DEMO_RECORD)
    check_replaceable(out, record, "demo", f"demo folder '{out}'")
    return out.is_dir() and bool(list_files(out))


def write_demo_record(out: Path) -> None:
    """Everything under OUT is the demo's (check_demo_folder made sure), interrupted or not."""
    if out.is_dir():
        files = sorted(set(list_files(out)) | {DEMO_RECORD})
        (out / DEMO_RECORD).write_text(json.dumps(ownership_record("demo", files), indent=2))


def _run_stages(args, out: Path, size: DemoSize, steps: int, t0: float, methods: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    configs = out / "configs"
    configs.mkdir(exist_ok=True)
    tag = (
        f"{'quick' if args.quick else 'full'}-scale{size.scale:g}-seed{args.seed}"
        f"-t{size.teacher_steps}-s{size.student_steps}"
    )
    cache = Path(args.cache_dir or Path.home() / ".cache" / "ddk" / "demo").expanduser() / tag
    cache.mkdir(parents=True, exist_ok=True)
    cached = (cache / "teacher" / "final").exists() and (cache / "student" / "final").exists()
    expect = ESTIMATE[(args.quick, cached)]
    if importlib.util.find_spec("lm_eval") is not None:
        expect += " plus about 3 minutes of benchmark scoring"
    print(
        f"ddk demo ({tag}) -> {out}\n"
        f"stages: corpus + tokenizer + prepare, teacher and student pre-training"
        f"{' (cached)' if cached else ''}, distillation with {', '.join(methods)}, report.\n"
        f"Expect {expect} on 2 CPU cores; each stage shows a progress bar with its ETA.",
        flush=True,
    )

    cross = bool(getattr(args, "cross_teacher", False))
    corpus, data = _prepare_all(cache, out, size, args.seed, configs, t0, byte_spans=cross)
    _, teacher, student = _models(cache, corpus, data, size, args.seed, configs, t0)
    no_benchmarks = getattr(args, "no_benchmarks", False)
    benchmarks = [] if no_benchmarks else demo_benchmarks(corpus, data, out, args.seed, t0)
    references = score_references(
        {"teacher": teacher, "student before": student}, benchmarks, out, t0
    )
    runs = []
    for i, method in enumerate(methods, 1):
        _stage(f"distilling with {method} ({i}/{len(methods)}, {steps} steps)", t0)
        runs.append(
            distill_stage(
                method, teacher, student, data, out, size, steps, args.seed, configs, benchmarks
            )
        )

    summary = summarize_runs(runs, benchmark_files=references)
    html = write_report(runs, out / "report", benchmark_files=references)
    results = results_text(summary)
    if cross:
        models = {"teacher": teacher, "student before": student}
        results += _cross_stage(args, out, cache, corpus, data, models, size, steps, runs, t0)
    (out / "results.md").write_text(results)
    print("\n" + results.replace("```\n", ""))
    _stage(f"done. Report: {html}  Configs to copy: {configs}", t0)
    return summary
