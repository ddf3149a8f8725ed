"""Resuming a run: exact after a SIGKILL, SIGTERM or crash at any point, past a corrupt or
half-written checkpoint; what a resume may change (--set) and what it refuses."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ddk.checkpoint import (
    list_checkpoints,
)
from ddk.cli import main
from ddk.config import load_config
from ddk.errors import DDKError
from ddk.metrics import read_metrics
from ddk.run_dir import resume_run, start_run
from ddk.schedule import lr_at
from tests.conftest import (
    LONG_RUN,
    copy_run,
    long_run_config,
    make_config,
    one_error_line,
    tree_digest,
    user_folder,
    world_config,
)

pytestmark = pytest.mark.slow


def _events(records, name):
    return [r for r in records if r.get("event") == name]


def ddk_process(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ddk.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def final_state(run: Path):
    weights = load_file(run / "final" / "model.safetensors")
    final = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "final_eval"][-1]
    domain_weights = {d: v["weight"] for d, v in final["domains"].items()}
    return weights, domain_weights, (run / "final" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, teacher_dir, student_dir, prepared_dir):
    root = tmp_path_factory.mktemp("reference")
    cfg = long_run_config(root / "c.yaml", teacher_dir, student_dir, prepared_dir, root / "run")
    assert main(["distill", str(cfg)]) == 0
    return root / "run"


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout=120) -> None:
    deadline = time.time() + timeout
    while not list_checkpoints(run):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def test_sigkill_at_random_points_then_resume_is_exact(
    tmp_path, reference_run, teacher_dir, student_dir, prepared_dir
):
    run = tmp_path / "run"
    cfg = long_run_config(tmp_path / "c.yaml", teacher_dir, student_dir, prepared_dir, run)
    rng = random.Random(0)
    proc = ddk_process("distill", str(cfg))
    kills = 0
    while True:
        _wait_for_checkpoint(run, proc)
        if kills == 1:  # aim one kill at a checkpoint being written
            deadline = time.time() + 5
            while not list((run / "checkpoints").glob(".tmp-step-*")) and time.time() < deadline:
                if proc.poll() is not None:
                    break
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if kills == 3:
            proc = ddk_process("distill", "--resume", str(run))
            break
        proc = ddk_process("distill", "--resume", str(run))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert kills >= 2
    ref_weights, ref_domains, ref_bytes = final_state(reference_run)
    weights, domains, raw = final_state(run)
    assert weights.keys() == ref_weights.keys()
    for k in weights:
        assert torch.equal(weights[k], ref_weights[k]), k
    assert domains == ref_domains
    assert raw == ref_bytes, "final weights differ byte for byte"


def test_sigterm_saves_and_prints_resume_hint(
    tmp_path, teacher_dir, student_dir, prepared_dir, reference_run
):
    run = tmp_path / "run"
    cfg = long_run_config(tmp_path / "c.yaml", teacher_dir, student_dir, prepared_dir, run)
    proc = ddk_process("distill", str(cfg))
    _wait_for_checkpoint(run, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    if "SIGTERM received" in out:  # (the run may have finished before the signal landed)
        assert f"ddk distill --resume {run}" in out
        assert not (run / "final").exists()
        step = list_checkpoints(run)[0][0]
        assert step < LONG_RUN["trainer.max_steps"]
        assert main(["distill", "--resume", str(run)]) == 0
    weights, domains, _ = final_state(run)
    ref_weights, ref_domains, _ = final_state(reference_run)
    assert domains == ref_domains
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def test_corrupt_newest_checkpoint_falls_back(
    tmp_path, teacher_dir, student_dir, prepared_dir, capsys, crash_at_step
):
    run = tmp_path / "run"
    cfg = long_run_config(tmp_path / "c.yaml", teacher_dir, student_dir, prepared_dir, run)
    disarm = crash_at_step(17)
    with pytest.raises(RuntimeError):
        main(["distill", str(cfg)])
    disarm()
    (newest_step, newest), (prev_step, _) = list_checkpoints(run)[:2]
    assert (newest_step, prev_step) == (15, 10)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncate
    capsys.readouterr()
    assert main(["distill", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint '{newest}' is unusable" in out and "model.safetensors" in out
    assert "resuming from" in out and "step-00000010" in out


def test_killed_during_checkpoint_write_leaves_previous_usable(
    tmp_path, teacher_dir, student_dir, prepared_dir, monkeypatch, reference_run
):
    run = tmp_path / "run"
    cfg = long_run_config(tmp_path / "c.yaml", teacher_dir, student_dir, prepared_dir, run)
    real_rename = Path.rename

    def die_on_second_checkpoint(self, target):
        if self.name.startswith(".tmp-step-00000010"):
            raise KeyboardInterrupt  # the process dies between writing and publishing
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", die_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        start_run(load_config(cfg))
    monkeypatch.setattr(Path, "rename", real_rename)
    assert [s for s, _ in list_checkpoints(run)] == [5]
    assert list((run / "checkpoints").glob(".tmp-step-*"))
    resume_run(run)
    assert not list((run / "checkpoints").glob(".tmp-step-*"))
    weights, domains, _ = final_state(run)
    ref_weights, ref_domains, _ = final_state(reference_run)
    assert domains == ref_domains and all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def test_resume_after_crash_matches_uninterrupted(
    tmp_path, teacher_dir, student_dir, prepared_dir, crash_at_step
):
    full = make_config(tmp_path / "full", teacher_dir, student_dir, prepared_dir)
    start_run(full)

    crashed = make_config(tmp_path / "crash", teacher_dir, student_dir, prepared_dir)
    disarm = crash_at_step(9)  # after the step-8 checkpoint, mid-interval
    with pytest.raises(RuntimeError, match="crash"):
        start_run(crashed)
    disarm()
    assert not (tmp_path / "crash" / "final").exists()
    resume_run(tmp_path / "crash")

    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "crash" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = read_metrics(tmp_path / "full" / "metrics.jsonl")
    rb = read_metrics(tmp_path / "crash" / "metrics.jsonl")
    strip = lambda rs: [  # noqa: E731 - timings differ between runs
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "eval_seconds")} for r in rs
    ]
    assert strip(ra) == strip(rb)


def test_resume_may_split_the_global_batch_otherwise_but_not_change_it(
    tmp_path, teacher_dir, student_dir, prepared_dir, crash_at_step
):
    """micro_batch_size x grad_accum_steps x processes is the run's global batch: a resume may
    split it otherwise (e.g. for another process count) and is the same run; changing it is
    refused in one line before anything is written."""
    start_run(make_config(tmp_path / "whole", teacher_dir, student_dir, prepared_dir))
    disarm = crash_at_step(5)
    with pytest.raises(RuntimeError):
        start_run(make_config(tmp_path / "run", teacher_dir, student_dir, prepared_dir))
    disarm()
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(DDKError, match="sequences_per_step 8 -> 4") as err:
        resume_run(tmp_path / "run", ["trainer.grad_accum_steps=1"])
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    split = ["trainer.micro_batch_size=2", "trainer.grad_accum_steps=4"]
    assert resume_run(tmp_path / "run", split) is not None
    whole = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "run" / "final" / "model.safetensors")
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=1e-4, atol=1e-5)


def test_resume_before_first_checkpoint_restarts(
    tmp_path, teacher_dir, student_dir, prepared_dir, crash_at_step
):
    disarm = crash_at_step(2)
    with pytest.raises(RuntimeError):
        start_run(make_config(tmp_path / "run", teacher_dir, student_dir, prepared_dir))
    disarm()
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert resume_run(tmp_path / "run") == tmp_path / "run" / "final"
    updates = _events(read_metrics(tmp_path / "run" / "metrics.jsonl"), "domain_update")
    assert [u["step"] for u in updates] == [0, 3, 6, 9]  # no duplicate step-0 record


def test_resume_with_allowed_set_continues_and_rebases_lr(world, capsys):
    run = copy_run(world, "more")
    capsys.readouterr()
    argv = ["distill", "--resume", str(run), "--set", "trainer.max_steps=9"]
    assert main([*argv, "--set", "trainer.lr=0.002"]) == 0
    assert "warning: trainer.lr changed from 0.003 to 0.002" in capsys.readouterr().out
    records = read_metrics(run / "metrics.jsonl")
    steps = {r["step"]: r for r in records if "event" not in r}
    assert sorted(steps) == list(range(1, 10))
    for s in (7, 8, 9):  # the rate the step used follows the new peak and length
        want = lr_at(s - 1, lr=0.002, min_lr=3e-4, warmup_steps=2, max_steps=9)
        assert steps[s]["lr"] == pytest.approx(want, rel=1e-12)
    updates = [r["step"] for r in records if r.get("event") == "domain_update"]
    assert updates == [0, 4, 8]
    newest = list_checkpoints(run)[0][1]
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["config"]["trainer"]["max_steps"] == 9
    # Interval 2 (step 8) plans only the one step that runs.
    assert np.load(newest / "plan.npy").shape == (1 * 4, 2)


def test_trust_remote_code_run_resumes_only_when_asked_again(world, capsys):
    run = world["root"] / "trusted"
    cfg = world_config(
        world["root"] / "trusted.yaml", world, run, **{"model.trust_remote_code": True}
    )
    assert main(["distill", cfg]) == 0  # the user's own config may turn it on
    capsys.readouterr()
    assert main(["distill", "--resume", str(run)]) == 2
    assert "--set model.trust_remote_code=true" in one_error_line(capsys.readouterr().err)
    argv = ["distill", "--resume", str(run), "--set", "model.trust_remote_code=true"]
    assert main(argv) == 0


def test_resume_refuses_a_folder_ddk_never_ran_in(tmp_path, capsys):
    # Before: `--resume` trained into the folder and rewrote the user's config.yaml.
    home = user_folder(tmp_path)
    before = tree_digest(home)
    assert main(["distill", "--resume", str(home)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "no run that ddk started" in err
    assert tree_digest(home) == before  # not even a lock file


def test_resume_still_accepts_a_run_that_died_before_its_first_checkpoint(tmp_path, capsys):
    # The lock file is the first thing a run writes: with it, the folder is a run, and resume
    # gets past the folder check to the config checks (made to fail here, before any model).
    home = user_folder(tmp_path)
    config = yaml.safe_load((home / "config.yaml").read_text())
    config["model"]["trust_remote_code"] = True
    (home / "config.yaml").write_text(yaml.safe_dump(config))
    (home / ".ddk.lock").write_text("1\n")
    assert main(["distill", "--resume", str(home)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "sets model.trust_remote_code" in err
