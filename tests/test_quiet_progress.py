"""TQDM_DISABLE=1 silences every progress bar ddk draws (prepare with auto-domains,
cache-teacher, distill). Subprocesses, because tqdm reads TQDM_* when it is imported."""

import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow


def _run(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ddk.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


def test_tqdm_disable_silences_auto_domains_and_cache_teacher(
    tmp_path, corpus, tokenizer_dir, teacher_dir, student_dir, prepared_dir
):
    # Before: both bars passed `disable=False`, which overrides TQDM_DISABLE=1 (tqdm reads it
    # at import, hence subprocesses).
    proc = _run(
        [
            "prepare",
            "--input",
            str(corpus[0]),
            "--output",
            str(tmp_path / "auto"),
            "--tokenizer",
            str(tokenizer_dir),
            "--seq-len",
            "32",
            "--val-sequences",
            "2",
            "--auto-domains",
            "2",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "auto-domains: sampling" not in proc.stderr + proc.stdout
    assert (tmp_path / "auto" / "clusters.json").is_file()

    config = {
        "model": {"teacher": str(teacher_dir), "student": str(student_dir)},
        "data": {"prepared": str(prepared_dir)},
        "teacher": {"cache": str(tmp_path / "cache"), "cache_k": 4},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    proc = _run(["cache-teacher", str(tmp_path / "run.yaml")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "cache-teacher:" not in proc.stderr + proc.stdout
    assert "cached" in proc.stdout + proc.stderr


def test_tqdm_disable_silences_the_distill_progress_bar(
    tmp_path, teacher_dir, student_dir, prepared_dir
):
    # Before: the bar passed `disable=` explicitly, which overrides TQDM_DISABLE=1. A subprocess,
    # because tqdm reads TQDM_* when it is imported.
    config = {
        "model": {"teacher": str(teacher_dir), "student": str(student_dir)},
        "data": {"prepared": str(prepared_dir)},
        "distill": {"K": 2},
        "trainer": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "micro_batch_size": 2,
            "warmup_steps": 1,
            "eval_batch_size": 4,
        },
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ddk.cli", "distill", str(tmp_path / "run.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "distill [ddk]" not in proc.stderr + proc.stdout
    assert (tmp_path / "run" / "final").is_dir()
