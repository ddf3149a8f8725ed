"""A base for benchmarks/method_sweep.py from a corpus shape of ddk.demo.corpora: the corpus, a
BPE tokenizer, prepared data (train/val/test), a teacher and a student pre-trained on it the
way `ddk demo` pre-trains its own, and OUT/configs/distill_ddk.yaml (the demo's distillation
settings at its --quick or full size).

    python benchmarks/sweep_bases.py --shape skewed7 --out /tmp/sweep-skewed7 [--seed 0] [--full]
    python benchmarks/method_sweep.py --out /tmp/sweep --base /tmp/sweep-skewed7 --seeds 0 1 2 \\
        --settings paper robust equal kd

The teacher is pre-trained on the natural mix; the student on STUDENT_MIXES[shape]: mostly
prose, a little of some domains, none of the others, so it lags the teacher unevenly (most on
what it never saw), as a small model does. Everything is built once: a folder that holds a
finished teacher and student is reused.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ddk.config import PrepareSection, load_config
from ddk.data.prepare import prepare
from ddk.demo.build import train_bpe_tokenizer
from ddk.demo.corpora import SHAPES, build_corpus
from ddk.demo.corpus import corpus_texts
from ddk.demo.run import FULL, QUICK, DemoSize, common_trainer, pretrain_models

# The student's pre-training mix per shape (domains the corpus lacks are dropped).
STUDENT_MIXES: dict[str, dict[str, float]] = {
    "unbalanced": {"prose": 0.8, "math": 0.15, "han": 0.05},  # as benchmarks/auto_domains.py
    "skewed7": {"prose": 0.8, "math": 0.1, "records": 0.05, "python": 0.05},  # no Han, C, Tcl
    "near_dup6": {"prose": 0.8, "records": 0.1, "math": 0.1},  # no docstrings, Python, C
    "wide8": {"prose": 0.7, "math": 0.2, "han": 0.1},  # no records, Python, C, Tcl, docstrings
    "han7": {"prose": 0.75, "math": 0.2, "han": 0.05},  # no Python, C, Tcl, records
    "code7": {"prose": 0.8, "math": 0.2},  # no Python, C, docstrings, records, Han
    "lag6": {"prose": 0.8, "math": 0.2},  # no records, Python, Han, C
}
DEFAULT_STUDENT_MIX = {"prose": 0.8, "math": 0.2}


def build_base(shape: str, out: Path, size: DemoSize, seed: int, scale: float = 1.0) -> Path:
    """Build (or reuse) everything under `out`; return the distill config's path. `scale`
    multiplies the shape's document counts."""
    configs = out / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    corpus, tok, data = out / "corpus", out / "tokenizer", out / "prepared"
    teacher, student = out / "teacher" / "final", out / "student" / "final"
    if not (teacher.exists() and student.exists()):
        if not (corpus / "SOURCES.md").exists():
            build_corpus(shape, corpus, seed=seed, scale=scale)
        if not (tok / "tokenizer.json").exists():
            train_bpe_tokenizer(corpus_texts(corpus), size.vocab, tok)
        cfg = PrepareSection(
            input=str(corpus),
            output=str(data),
            tokenizer=str(tok),
            seq_len=size.seq_len,
            val_sequences=size.val_sequences,
            seed=seed,
            overwrite=True,
        )
        prepare(cfg, str(tok))
        domains = [p.name for p in sorted(corpus.iterdir()) if p.is_dir()]
        mix = STUDENT_MIXES.get(shape, DEFAULT_STUDENT_MIX)
        student_mix = {d: w for d, w in mix.items() if d in domains}
        pretrain_models(out, data, size, seed, configs, time.perf_counter(), student_mix)
    cfg = load_config(
        None,
        [
            f"model.teacher={teacher}",
            f"model.student={student}",
            f"data.prepared={data}",
            "distill.method=ddk",
            f"distill.K={size.K}",
            *common_trainer(size, size.distill_steps, out / "runs" / "ddk", 1e-3, seed),
        ],
    )
    path = configs / "distill_ddk.yaml"
    cfg.save(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="corpus, tokenizer and models")
    p.add_argument("--full", action="store_true", help="the demo's full size (default: quick)")
    args = p.parse_args(argv)
    path = build_base(args.shape, Path(args.out), FULL if args.full else QUICK, args.seed)
    print(f"base: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
