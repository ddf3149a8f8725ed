"""The step benchmark still runs end to end on the library's current API (a smoke test: no
timings are asserted; speed targets are read off the benchmark's table, not tested here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


@pytest.mark.slow
def test_bench_step_rows_run(tmp_path):
    out = tmp_path / "table.md"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--preset", "tiny", "--steps", "1", "--warmup", "0",
         "--rows", "naive", "online", "offline", "--out", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    table = out.read_text()
    for row in ("naive (full logits", "ddk online", "ddk offline"):
        line = next(line for line in table.splitlines() if row in line)
        assert "failed" not in line, line
        assert float(line.split("|")[2].replace(",", "")) > 0  # tokens/s
