"""`ddk prepare` throughput next to the raw speed of the same tokenizer on the same text.

    python benchmarks/bench_prepare.py [--scale 1.0] [--vocab 8192] [--repeats 2]

The corpus is the demo corpus (stdlib code, prose, generated math and records) written as
JSONL; "raw" is `encode_batch_fast` over the texts already in memory, batches of 1000 — the
ceiling for any tokenise-once pipeline. Goal: prepare >= 0.8x raw.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from ddk.config import PrepareSection
from ddk.data.prepare import prepare
from ddk.demo.build import train_bpe_tokenizer
from ddk.demo.corpus import build_demo_corpus
from ddk.models import load_tokenizer
from ddk.table import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ddk-bench-prepare-"))
    try:
        corpus = work / "corpus"
        build_demo_corpus(corpus, scale=args.scale)
        texts = [
            json.loads(line)["text"] for f in sorted(corpus.glob("*/*.jsonl")) for line in f.open()
        ]
        mb = sum(len(t.encode()) for t in texts) / 1e6
        tok_dir = train_bpe_tokenizer(texts, args.vocab, work / "tok")
        backend = load_tokenizer(str(tok_dir)).backend_tokenizer

        raw_best, tokens = float("inf"), 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            tokens = 0
            for i in range(0, len(texts), 1000):
                enc = backend.encode_batch_fast(texts[i : i + 1000], add_special_tokens=False)
                tokens += sum(len(e.ids) for e in enc)
            raw_best = min(raw_best, time.perf_counter() - start)

        prep_best = float("inf")
        for r in range(args.repeats):
            out = work / f"prepared{r}"
            cfg = PrepareSection(input=str(corpus), output=str(out), seq_len=512, val_sequences=8)
            start = time.perf_counter()
            prepare(cfg, str(tok_dir), progress=False)
            prep_best = min(prep_best, time.perf_counter() - start)

        rows = [
            ["encode_batch_fast (raw, in memory)", mb / raw_best, tokens / raw_best, 1.0],
            [
                "ddk prepare (read + tokenise + write + split)",
                mb / prep_best,
                tokens / prep_best,
                raw_best / prep_best,
            ],
        ]
        print(
            f"corpus: {len(texts):,} documents, {mb:.2f} MB, {tokens:,} tokens; "
            f"vocab {args.vocab}; best of {args.repeats}"
        )
        print(format_table(["pipeline", "MB/s", "tokens/s", "x raw"], rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
