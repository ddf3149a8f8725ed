"""Tokens that no split keeps, per domain, by `prepare.heldout_windows_per_document`.

    python benchmarks/heldout_unused.py [--scale 1.0] [--seq-len 128]
        [--val-sequences 24 128 500] [--per-document 1 4]

The corpus is the demo corpus (stdlib code, prose, generated math and records) plus `books`:
every 12 consecutive prose documents joined into one long document. A held-out document's
tokens past its windows are in no split ("unused"); with one window per document (what ddk did
before format 3, which kept seq_len tokens of each) a long-document domain loses most of what it
holds out. Prints, per setting, each domain's unused share of its tokens (copies of held-out
texts included) and its validation/test documents.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from ddk.config import PrepareSection
from ddk.data.prepare import prepare
from ddk.demo.build import train_bpe_tokenizer
from ddk.demo.corpus import build_demo_corpus
from ddk.table import format_table

BOOK_PARTS = 12  # prose documents per `books` document


def build_corpus(folder: Path, scale: float) -> list[str]:
    build_demo_corpus(folder, scale=scale)
    prose = [json.loads(line)["text"] for line in (folder / "prose" / "part-00000.jsonl").open()]
    books = ["\n\n".join(prose[i : i + BOOK_PARTS]) for i in range(0, len(prose), BOOK_PARTS)]
    (folder / "books").mkdir()
    with open(folder / "books" / "part-00000.jsonl", "w") as fh:
        fh.writelines(json.dumps({"text": b}) + "\n" for b in books)
    return [json.loads(line)["text"] for f in sorted(folder.glob("*/*.jsonl")) for line in f.open()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--val-sequences", type=int, nargs="+", default=[24, 128, 500])
    parser.add_argument("--per-document", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ddk-bench-heldout-"))
    try:
        corpus = work / "corpus"
        tok_dir = train_bpe_tokenizer(build_corpus(corpus, args.scale), args.vocab, work / "tok")
        for val in args.val_sequences:
            results = {}
            for most in args.per_document:
                cfg = PrepareSection(
                    input=str(corpus),
                    output=str(work / f"prepared-{val}-{most}"),
                    seq_len=args.seq_len,
                    val_sequences=val,
                    heldout_windows_per_document=most,
                )
                results[most] = prepare(cfg, str(tok_dir), progress=False)["domains"]
            first = results[args.per_document[0]]
            rows = []
            for name, info in first.items():
                row = [name, info["documents"], round(info["total_tokens"] / info["documents"])]
                for most in args.per_document:
                    d = results[most][name]
                    unused = d["heldout_unused_tokens"] + d["duplicate_tokens"]
                    row += [
                        f"{100 * unused / d['total_tokens']:.1f}%",
                        f"{d['val_sequences']}/{d['test_sequences']} "
                        f"({d['val_documents']}/{d['test_documents']})",
                    ]
                rows.append(row)
            headers = ["domain", "documents", "tokens/doc"]
            for most in args.per_document:
                headers += [f"unused, at most {most}", "val/test windows (docs)"]
            print(f"\nseq_len {args.seq_len}, {val} validation and test windows per domain")
            print(format_table(headers, rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
