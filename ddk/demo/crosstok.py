"""`ddk demo --cross-teacher`: distil through a teacher with ANOTHER tokenizer.

second tokenizer: byte-level BPE with half the vocabulary and every digit its own
    pre-token, trained on the same corpus (it cuts text differently, numbers most of all)
-> teacher-x: the teacher's shape, pre-trained on the natural mix in its own tokens (cached)
-> kd@x / ddk@x: `ddk distill` with teacher.tokenizer: cross (byte-aligned loss, DDK's
   ratio from the NLL of the same bytes), same steps and seed as the other methods
-> a table of test perplexity PER BYTE (comparable across tokenizers) for the teachers, the
   student before, and every run.
"""

from __future__ import annotations

import math
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from ddk.config import PrepareSection
from ddk.data.dataset import PreparedData
from ddk.data.prepare import prepare
from ddk.demo.build import train_bpe_tokenizer
from ddk.demo.corpus import corpus_texts
from ddk.evaluate import domain_perplexities
from ddk.table import format_table
from ddk.teacher.crosstok import CrossTokenizerTeacher

SUFFIX = "@x"  # a method label's suffix: distilled through the cross-tokenizer teacher
CROSS_OVERRIDES = ["teacher.tokenizer=cross"]


def cross_method(method: str) -> tuple[str, list[str]]:
    """'kd' -> ('kd@x', overrides); 'kd:skip' -> ('kd@x-skip', ... distill.cross_mismatch=skip),
    likewise 'kd:merge': the mismatch loss ULD (default), GOLD's merged spans or none, the
    ablations the README reports."""
    base, _, mismatch = method.partition(":")
    extra = [*CROSS_OVERRIDES, *([f"distill.cross_mismatch={mismatch}"] if mismatch else [])]
    return base + SUFFIX + (f"-{mismatch}" if mismatch else ""), extra


def second_tokenizer(cache: Path, corpus: Path, vocab: int) -> Path:
    """The other tokenizer (module doc), trained once per cache."""
    tok_dir = cache / "tokenizer-x"
    if not (tok_dir / "tokenizer.json").exists():
        train_bpe_tokenizer(corpus_texts(corpus), max(300, vocab // 2), tok_dir, split_digits=True)
    return tok_dir


def prepare_in(tok_dir: Path, corpus: Path, out: Path, seq_len: int, val: int, seed: int) -> Path:
    """The corpus in the second tokenizer's tokens (teacher-x's pre-training data)."""
    cfg = PrepareSection(input=str(corpus), output=str(out), tokenizer=str(tok_dir),
                         seq_len=seq_len, val_sequences=val, seed=seed, overwrite=True)  # fmt: skip
    prepare(cfg, str(tok_dir), progress=False)
    return out


def byte_perplexities(models: dict[str, Path], runs: list[Path], data: Path, cross: Path,
                      split: str = "test") -> dict[str, dict[str, float]]:  # fmt: skip
    """{label: {domain: test perplexity per byte}} of the same-tokenizer `models`, each run's
    final student and the cross-tokenizer teacher `cross` (scored on the same bytes)."""
    prepared = PreparedData(data)
    split = split if prepared.has_split(split) else "val"
    out = {}
    for label, path in [*models.items(), *((r.name, r / "final") for r in runs)]:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False).eval()
        res = domain_perplexities(model, prepared, vocab_size=prepared.vocab_size, split=split)
        out[label] = {d: r["ppl_byte"] for d, r in res.items()}
    student_tok = AutoTokenizer.from_pretrained(
        next(iter(models.values())), trust_remote_code=False
    )
    teacher = CrossTokenizerTeacher(AutoModelForCausalLM.from_pretrained(cross, trust_remote_code=False).eval(),
                                    AutoTokenizer.from_pretrained(cross, trust_remote_code=False), student_tok, prepared)  # fmt: skip
    out["teacher-x"] = {d: r["ppl_byte"] for d, r in teacher.details(split).items()}
    return out


def byte_table(ppl: dict[str, dict[str, float]]) -> str:
    """Per-domain perplexity per byte, one column per model, plus the arithmetic mean."""
    labels = list(ppl)
    domains = list(next(iter(ppl.values())))
    rows = [[d] + [f"{ppl[m][d]:.4f}" for m in labels] for d in domains]
    rows.append(["mean"] + [f"{mean_ppl(ppl[m]):.4f}" for m in labels])
    return format_table(["domain", *labels], rows)


def mean_ppl(per_domain: dict[str, float]) -> float:
    return sum(per_domain.values()) / len(per_domain)


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))
