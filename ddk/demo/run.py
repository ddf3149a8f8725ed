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
from ddk.demo.chat import build_chat_corpus, train_chat_tokenizer
from ddk.demo.corpus import build_demo_corpus, corpus_texts
from ddk.demo.tasks import write_demo_tasks
from ddk.errors import DDKError
from ddk.harness import LM_EVAL_EXTRA, BenchmarkPlan, benchmarks_payload, score, write_benchmarks
from ddk.lock import FolderLock
from ddk.methods import METHODS, PRESETS
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
# Wall time on a 2-core CPU machine, by (quick, teacher and student cached): measured with
# four methods, scaled by 6/4 for the six distillations the demo runs now.
ESTIMATE = {
    (False, False): "about 6-9 minutes",
    (False, True): "about 3 minutes",
    (True, False): "about 2 minutes",
    (True, True): "about 1-2 minutes",
}
TEACHER = {"hidden_size": 128, "num_layers": 4, "num_heads": 4}
STUDENT = {"hidden_size": 64, "num_layers": 2, "num_heads": 2}
# The student's pre-training mix: mostly prose, little of the rest, none of math.
STUDENT_MIX = {"prose": 0.8, "records": 0.15, "code": 0.05, "math": 0.0}
# --chat: conversations need longer rows; the student has seen little code and no math.
CHAT_SEQ_LEN = 128
CHAT_STUDENT_MIX = {"records": 0.85, "code": 0.15, "math": 0.0}
CHAT_METHODS = ["kd", "ddk", "ddk+robust", "equal"]


def _stage(msg: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)


def common_trainer(size: DemoSize, steps: int, out_dir: Path, lr: float, seed: int) -> list[str]:
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


def pretrain(
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
        *common_trainer(size, steps, run_dir, lr, seed),
    ]
    cfg = load_config(None, overrides)
    cfg.save(configs / f"{name}.yaml")
    return _finished(start_run(cfg))


def pretrain_models(
    cache: Path, data: Path, size: DemoSize, seed: int, configs: Path, t0, student_mix
):
    """The teacher (natural mix) and the student base (`student_mix`) pre-trained on `data`
    with the tokenizer in CACHE/tokenizer: built once under `cache`, reused by later runs.
    Returns (tokenizer, teacher, student) folders. The demo and the benchmarks' corpora use it."""
    tok_dir = cache / "tokenizer"
    teacher = cache / "teacher" / "final"
    student = cache / "student" / "final"
    if teacher.exists() and student.exists():
        _stage(f"using cached teacher and student in {cache}", t0)
        return tok_dir, teacher, student
    tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    for name, shape, steps, mix, lr in (
        ("teacher", TEACHER, size.teacher_steps, "natural", 3e-3),
        ("student", STUDENT, size.student_steps, student_mix, 3e-3),
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
        pretrain(init, data, run_dir, size, steps, mix, lr, seed, configs, f"pretrain_{name}")
    return tok_dir, teacher, student


# The "math teacher" and "code teacher": the teacher trained this share of its pre-training
# steps longer on its own domain alone (choice).
DOMAIN_TEACHER_SHARE = 0.5
DOMAIN_TEACHER_DOMAINS = ("math", "code")


def _domain_teachers(cache: Path, data: Path, teacher: Path, size: DemoSize, seed, configs, t0):
    """{domain: its teacher}: the shared teacher trained longer on that domain alone (cached)."""
    steps = max(1, int(size.teacher_steps * DOMAIN_TEACHER_SHARE))
    teachers = {}
    for domain in DOMAIN_TEACHER_DOMAINS:
        run_dir = cache / f"teacher-{domain}"
        teachers[domain] = run_dir / "final"
        if teachers[domain].exists():
            continue
        _stage(f"training the {domain} teacher ({steps} more steps on {domain} alone)", t0)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        mix = {d: float(d == domain) for d in STUDENT_MIX}
        name = f"pretrain_teacher_{domain}"
        pretrain(teacher, data, run_dir, size, steps, mix, 1e-3, seed, configs, name)
    return teachers


def domain_teacher_table(runs: list[Path]) -> str | None:
    """Per-domain test perplexity of the shared teacher and of the teacher each domain used in
    the runs with a teacher per domain (from their RUN/teacher_ppl.json); None without both."""
    records = {}
    for run in runs:
        path = run / "teacher_ppl.json"
        if path.is_file():
            kind = "domain" if split_variant(run.name)[1] == "domain" else "shared"
            records.setdefault(kind, json.loads(path.read_text()))
    if set(records) != {"shared", "domain"}:
        return None
    split = "test" if "test" in records["shared"]["ppl"] else "val"
    shared, own = records["shared"]["ppl"][split], records["domain"]["ppl"][split]
    teachers = records["domain"]["key"].get("teachers", {})
    rows = [
        [d, shared[d], own[d], Path(teachers.get(d, "")).parent.name or "shared"] for d in shared
    ]
    return format_table(["domain", "shared teacher", "its own teacher", "which"], rows)


def _prepare_all(
    cache: Path, out: Path, size: DemoSize, seed: int, configs: Path, t0, byte_spans: bool = False
):
    corpus = out / "corpus"
    stats = build_demo_corpus(corpus, scale=size.scale, seed=seed)
    sizes = ", ".join(f"{d} {s['bytes'] / 1e6:.2f} MB" for d, s in stats.items())
    _stage(f"corpus built in {corpus}: {sizes}", t0)
    tok_dir = cache / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_bpe_tokenizer(corpus_texts(corpus), size.vocab, tok_dir)
        _stage(f"trained a {size.vocab}-token BPE tokenizer", t0)
    # byte spans: a cross-tokenizer teacher (--cross-teacher) re-tokenises the text
    extra = {"byte_spans": True} if byte_spans else {}
    return corpus, _prepare_stage(corpus, tok_dir, out, size, seed, configs, **extra)


def _prepare_stage(corpus, tok_dir: Path, out: Path, size: DemoSize, seed, configs, **extra):
    """`ddk prepare` of the demo corpus with the demo's own tokenizer; OUT/prepared."""
    cfg = Config(
        prepare=PrepareSection(
            input=str(corpus),
            output=str(out / "prepared"),
            tokenizer=str(tok_dir),
            seq_len=size.seq_len,
            val_sequences=size.val_sequences,
            seed=seed,
            overwrite=True,  # the demo owns OUT/prepared; a --quick run may have left another size
            **extra,
        )
    )
    cfg.save(configs / "prepare.yaml")
    prepare(cfg.prepare, str(tok_dir), trust_remote_code=False)
    return out / "prepared"


def _prepare_chat(cache: Path, out: Path, size: DemoSize, seed: int, configs: Path, t0):
    """`--chat`: the chat corpus, its tokenizer (with a ChatML template) and `ddk prepare
    --format chat` (assistant-only loss mask, isolated packing)."""
    corpus = out / "corpus"
    stats = build_chat_corpus(corpus, scale=size.scale, seed=seed)
    sizes = ", ".join(f"{d} {s['conversations']} conversations" for d, s in stats.items())
    _stage(f"chat corpus built in {corpus}: {sizes}", t0)
    tok_dir = cache / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_chat_tokenizer(corpus, size.vocab, tok_dir)
        _stage(f"trained a {size.vocab}-token BPE tokenizer with a ChatML template", t0)
    return corpus, _prepare_stage(corpus, tok_dir, out, size, seed, configs, format="chat")


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
    domain_teachers: dict[str, Path] | None = None,
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
        *common_trainer(size, steps, run_dir, 1e-3, seed),
        *benchmarks,
        *VARIANTS[variant],
        *extra,
    ]
    if variant == "domain":
        teachers = {d: str(t) for d, t in (domain_teachers or {}).items()}
        overrides.append(f"model.teachers={json.dumps(teachers)}")
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


# A variant -> its overrides: the opt-in interval-0 floor, each `distill.preset` (ddk only),
# and `domain`: the math and code teachers (model.teachers; any method but cpt).
VARIANTS: dict[str, list[str]] = {
    "": [],
    "floor": ["distill.init_floor=true"],
    **{name: [f"distill.preset={name}"] for name in PRESETS},
    "domain": [],  # a teacher per domain: model.teachers, set from the demo's teachers
}


def _cross_stage(args, out, cache, corpus, data, models, size, steps, runs, t0,
                 domain_teachers=None) -> str:  # fmt: skip
    """`--cross-teacher` (`ddk.demo.crosstok`): teacher-x with its own tokenizer, kd@x and
    ddk@x through it, and every model's test perplexity per byte; returns results.md's part.
    With `domain_teachers` (--domain-teachers) also METHOD@x+domain: teacher-x for code, the
    math teacher for math, the shared teacher elsewhere, all through the cross path."""
    configs = out / "configs"
    tok_x = crosstok.second_tokenizer(cache, corpus, size.vocab)
    teacher_x = cache / "teacher-x" / "final"
    if not teacher_x.exists():
        data_x = crosstok.prepare_in(tok_x, corpus, out / "prepared-x", 2 * size.seq_len,
                                     size.val_sequences, args.seed)  # fmt: skip
        tok = AutoTokenizer.from_pretrained(tok_x, trust_remote_code=False)
        init = cache / "teacher-x-init"
        tiny_causal_lm(len(tok), max_positions=4 * size.seq_len, seed=args.seed + 7,
                       **TEACHER).save_pretrained(init)  # fmt: skip
        tok.save_pretrained(init)
        _stage(
            f"pre-training teacher-x ({len(tok)}-token tokenizer, {size.teacher_steps} steps)", t0
        )
        pretrain(init, data_x, cache / "teacher-x", size, size.teacher_steps, "natural", 3e-3,
                  args.seed, configs, "pretrain_teacher_x")  # fmt: skip
    cross_runs = []
    for method in args.cross_methods:
        label, extra = crosstok.cross_method(method)
        _stage(f"distilling with {label} (teacher-x, {steps} steps)", t0)
        cross_runs.append(distill_stage(label, teacher_x, models["student before"], data, out,
                                        size, steps, args.seed, configs, extra=extra))  # fmt: skip
        if domain_teachers:
            teachers = {**{d: str(t) for d, t in domain_teachers.items()}, "code": str(teacher_x)}
            extra = [*extra, f"model.teachers={json.dumps(teachers)}"]
            _stage(f"distilling with {label}+domain (code: teacher-x, {steps} steps)", t0)
            cross_runs.append(distill_stage(f"{label}+domain", models["teacher"],
                                            models["student before"], data, out, size, steps,
                                            args.seed, configs, extra=extra))  # fmt: skip
    ppl = crosstok.byte_perplexities(models, runs + cross_runs, data, teacher_x)
    (out / "cross_results.json").write_text(json.dumps(ppl, indent=2))
    return (
        "\nTest perplexity PER BYTE (total NLL / UTF-8 bytes of the same texts; comparable "
        "across tokenizers). teacher-x has its own tokenizer; @x runs distilled through it.\n\n"
        "```\n" + crosstok.byte_table(ppl) + "\n```\n"
    )


def split_variant(label: str) -> tuple[str, str]:
    """'ddk+floor' -> ('ddk', 'floor'): a method plus an opt-in variant, as the report labels it
    (ddk+robust: `distill.preset: robust`)."""
    base, _, variant = label.partition("+")
    ddk_only = variant not in ("", "domain") and base != "ddk"
    wrong_base = ddk_only or (variant == "domain" and base == "cpt")
    if base not in METHODS or variant not in VARIANTS or wrong_base:
        variants = ", ".join(f"ddk+{v}" for v in VARIANTS if v and v != "domain")
        raise DDKError(
            f"demo method '{label}' is unknown; use one of {', '.join(METHODS)}, {variants} or "
            "METHOD+domain (a teacher per domain; not cpt)"
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


def results_text(summary: dict, teachers: str | None = None) -> str:
    """results.md: the perplexity table, then (when scored) the benchmark table."""
    caption = (
        f"Perplexity per domain on the {summary['split']} split (lower is better; "
        + ("held out, nothing was tuned on it" if summary["split"] == "test" else "no test split")
        + "); worst ratio = largest student/teacher perplexity ratio."
    )
    if summary.get("targets"):  # chat data
        caption += f" Perplexities count only the targets of the {' / '.join(summary['targets'])}."
    text = caption + "\n\n```\n" + demo_table(summary) + "\n```\n"
    if teachers is not None:
        text += (
            "\nTeacher perplexity per domain: the shared teacher, and the teacher each domain "
            "used in the +domain runs (their ratios are against it):\n\n```\n"
            + teachers
            + "\n```\n"
        )
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
    chat = getattr(args, "chat", False)
    if chat:  # rows twice as long, half as many: the same tokens per step
        size = DemoSize(**{**size.__dict__, "seq_len": CHAT_SEQ_LEN, "batch": size.batch // 2})
    steps = args.steps or size.distill_steps
    methods = list(args.methods or (CHAT_METHODS if chat else DEFAULT_METHODS)) + (
        ["ddk+floor"] if getattr(args, "init_floor_variant", False) else []
    )
    if getattr(args, "domain_teachers", False):
        methods += [f"{m}+domain" for m in methods if m in METHODS and m != "cpt"]
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


DEFAULT_METHODS = ["cpt", "kd", "ddk", "ddk+robust", "ddk+focus", "equal"]
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
    chat = getattr(args, "chat", False)
    tag = (
        f"{'chat-' if chat else ''}{'quick' if args.quick else 'full'}-scale{size.scale:g}-seed{args.seed}"
        f"-t{size.teacher_steps}-s{size.student_steps}"
    )
    cache = Path(args.cache_dir or Path.home() / ".cache" / "ddk" / "demo").expanduser() / tag
    cache.mkdir(parents=True, exist_ok=True)
    cached = (cache / "teacher" / "final").exists() and (cache / "student" / "final").exists()
    expect = ESTIMATE[(args.quick, cached)]
    if importlib.util.find_spec("lm_eval") is not None and not chat:
        expect += " plus about 3 minutes of benchmark scoring"
    print(
        f"ddk demo ({tag}) -> {out}\n"
        f"stages: corpus + tokenizer + prepare, teacher and student pre-training"
        f"{' (cached)' if cached else ''}, distillation with {', '.join(methods)}, report.\n"
        f"Expect {expect} on 2 CPU cores; each stage shows a progress bar with its ETA.",
        flush=True,
    )

    cross = bool(getattr(args, "cross_teacher", False))
    if chat:
        corpus, data = _prepare_chat(cache, out, size, args.seed, configs, t0)
    else:
        corpus, data = _prepare_all(cache, out, size, args.seed, configs, t0, byte_spans=cross)
    mix = CHAT_STUDENT_MIX if chat else STUDENT_MIX
    _, teacher, student = pretrain_models(cache, data, size, args.seed, configs, t0, mix)
    domain_teachers = None
    wants = getattr(args, "domain_teachers", False) and cross  # METHOD@x+domain
    if wants or any(split_variant(m)[1] == "domain" for m in methods):
        domain_teachers = _domain_teachers(cache, data, teacher, size, args.seed, configs, t0)
    # the benchmark tasks are built from raw-text test documents: none for chat data
    no_benchmarks = chat or getattr(args, "no_benchmarks", False)
    benchmarks = [] if no_benchmarks else demo_benchmarks(corpus, data, out, args.seed, t0)
    references = score_references(
        {"teacher": teacher, "student before": student}, benchmarks, out, t0
    )
    runs = []
    for i, method in enumerate(methods, 1):
        _stage(f"distilling with {method} ({i}/{len(methods)}, {steps} steps)", t0)
        stage_args = (teacher, student, data, out, size, steps, args.seed, configs)
        runs.append(distill_stage(method, *stage_args, benchmarks, domain_teachers))

    summary = summarize_runs(runs, benchmark_files=references)
    html = write_report(runs, out / "report", benchmark_files=references)
    results = results_text(summary, domain_teacher_table(runs))
    if cross:
        models = {"teacher": teacher, "student before": student}
        results += _cross_stage(args, out, cache, corpus, data, models, size, steps, runs, t0,
                                domain_teachers)  # fmt: skip
    (out / "results.md").write_text(results)
    print("\n" + results.replace("```\n", ""))
    _stage(f"done. Report: {html}  Configs to copy: {configs}", t0)
    return summary
