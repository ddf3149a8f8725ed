"""Teacher-cache bytes for chat data: every position of a packed row, or only the masked-in ones.

    python benchmarks/chat_cache_bytes.py PREPARED [--k 64] [--samples 32]

PREPARED is a folder written by `ddk prepare --format chat` (e.g. OUT/prepared of
`ddk demo --chat --quick`). `ddk cache-teacher` stores every position of every training row (fixed
rows found by index; the data's loss mask marks which positions count). Prints per domain the
positions, the loss targets among them, and the cache bytes of both layouts at the default
cache_k / cache_samples (a masked-only layout would also need a per-row offset index, not
counted).
"""

from __future__ import annotations

import argparse

import numpy as np

from ddk.data.dataset import PreparedData
from ddk.data.packing import MASK_SUFFIX, TARGET
from ddk.table import format_table
from ddk.teacher.cache_format import bytes_per_token


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prepared")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--samples", type=int, default=32)
    args = p.parse_args()
    data = PreparedData(args.prepared)
    if not data.masked:
        raise SystemExit(f"{args.prepared} is not chat data")
    per_token = bytes_per_token(args.k, data.vocab_size, args.samples)
    rows, totals = [], np.zeros(2, dtype=np.int64)
    for name, shard in data.domains.items():
        L, n = data.seq_len, shard.num_train_sequences
        mask = np.fromfile(shard.folder / f"train{MASK_SUFFIX}", dtype=np.uint8)
        # position t of row r predicts token r*L + t + 1: the targets are mask[1 : n*L + 1]
        targets = int((mask[1 : n * L + 1] & TARGET != 0).sum())
        totals += (n * L, targets)
        rows.append(_row(name, n * L, targets, per_token))
    rows.append(_row("total", int(totals[0]), int(totals[1]), per_token))
    headers = ["domain", "positions", "targets", "share", "all positions", "targets only"]
    print(f"cache_k={args.k}, cache_samples={args.samples}: {per_token} bytes per position")
    print(format_table(headers, rows))


def _row(name: str, positions: int, targets: int, per_token: int) -> list:
    mib = 1 / (1 << 20)
    return [
        name,
        positions,
        targets,
        f"{100 * targets / max(positions, 1):.1f}%",
        f"{positions * per_token * mib:.1f} MiB",
        f"{targets * per_token * mib:.1f} MiB",
    ]


if __name__ == "__main__":
    main()
