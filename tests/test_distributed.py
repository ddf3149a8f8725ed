"""A real two-process run (torch.distributed with gloo on CPU, through Accelerate) equals a
one-process run with the same global batch: same losses, domain weights and final weights."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ddk.metrics import read_metrics


def _config(path, root, teacher, student, data, micro, accum):
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"teacher": str(teacher), "student": str(student)},
                "data": {"prepared": str(data)},
                "distill": {"K": 4},
                "trainer": {
                    "output_dir": str(root),
                    "max_steps": 8,
                    "micro_batch_size": micro,
                    "grad_accum_steps": accum,
                    "lr": 3e-3,
                    "min_lr": 3e-4,
                    "warmup_steps": 2,
                    "log_every": 2,
                    "save_every": 4,
                    "eval_batch_size": 4,
                },
            }
        )
    )
    return path


@pytest.mark.skipif(
    shutil.which("torchrun") is None
    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun not installed",
)
def test_two_processes_match_one(tmp_path, teacher_dir, student_dir, prepared_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    one = _config(
        tmp_path / "one.yaml", tmp_path / "one", teacher_dir, student_dir, prepared_dir, 4, 2
    )
    two = _config(
        tmp_path / "two.yaml", tmp_path / "two", teacher_dir, student_dir, prepared_dir, 2, 2
    )
    subprocess.run(
        [sys.executable, "-m", "ddk.cli", "distill", str(one)],
        check=True,
        env=env,
        capture_output=True,
    )
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "ddk.cli",
            "distill",
            str(two),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    a = read_metrics(tmp_path / "one" / "metrics.jsonl")
    b = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r.get("event") for r in a] == [r.get("event") for r in b]
    for ra, rb in zip(a, b):
        if "loss" in ra:
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        if "domains" in ra:
            for d in ra["domains"]:
                assert rb["domains"][d]["weight"] == pytest.approx(
                    ra["domains"][d]["weight"], rel=1e-5
                )
                assert rb["domains"][d]["student_ppl"] == pytest.approx(
                    ra["domains"][d]["student_ppl"], rel=1e-5
                )
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
