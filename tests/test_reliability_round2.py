"""Reliability, round 2 (issue 8): one run per folder, never replace what ddk did not write,
every user error one line and exit 2, and `--resume` cannot be steered by editing a run folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ddk.checkpoint import (
    checkpoint_bytes,
    list_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from ddk.cli import main
from ddk.errors import DDKError
from ddk.lock import LOCK_NAME, FolderLock
from ddk.metrics import read_metrics
from ddk.schedule import lr_at
from ddk.step import DistillStep

BASE = {
    "trainer.max_steps": 6,
    "trainer.micro_batch_size": 4,
    "trainer.lr": 3e-3,
    "trainer.min_lr": 3e-4,
    "trainer.warmup_steps": 2,
    "trainer.log_every": 1,
    "trainer.save_every": 3,
    "trainer.eval_batch_size": 4,
    "distill.K": 4,  # the second interval (steps 4-5) is cut short by max_steps
    "distill.loss_chunk_tokens": 64,
}


def write_config(path: Path, w: dict, run_dir: Path, **extra) -> str:
    items = {
        "model.teacher": str(w["teacher"]),
        "model.student": str(w["student"]),
        "data.prepared": str(w["data"]),
        "trainer.output_dir": str(run_dir),
        **BASE,
        **extra,
    }
    data: dict = {}
    for key, value in items.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    path.write_text(yaml.safe_dump(data))
    return str(path)


def digest(root: Path) -> str:
    """Every folder and file under root (ddk's lock files aside: they only record a PID)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.name == LOCK_NAME:
            continue
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_dir, student_dir, prepared_dir):
    root = tmp_path_factory.mktemp("rr2")
    w = {"root": root, "teacher": teacher_dir}
    shutil.copytree(student_dir, root / "student")
    w["student"] = root / "student"
    shutil.copytree(prepared_dir, root / "data")
    w["data"] = root / "data"
    corrupt = root / "corrupt_student"
    shutil.copytree(student_dir, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    w["corrupt"] = corrupt
    # Two finished runs: one shared by the refusal cases, one on its own data copy.
    assert main(["distill", write_config(root / "base.yaml", w, root / "base")]) == 0
    w["base"] = root / "base"
    shutil.copytree(prepared_dir, root / "data_d")
    cfg = write_config(root / "d.yaml", {**w, "data": root / "data_d"}, root / "run_d")
    assert main(["distill", cfg]) == 0
    w["run_d"] = root / "run_d"
    return w


def _copy_run(w, name: str, edit: dict | None = None) -> Path:
    run = w["root"] / f"resume_{name}"
    if not run.exists():
        shutil.copytree(w["base"], run)
    if edit:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        for key, value in edit.items():
            section, field = key.split(".")
            cfg[section][field] = value
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def _reprepared(w) -> Path:
    manifest = w["root"] / "data_d" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["created"] = "2000-01-01T00:00:00+0000"  # what preparing the folder again changes
    manifest.write_text(json.dumps(m))
    return w["run_d"]


def _shard_edited(w) -> Path:
    shard = w["root"] / "data_d" / "code" / "train.bin"
    tokens = bytearray(shard.read_bytes())
    tokens[0] ^= 1  # one token changed in place: same size, same manifest
    shard.write_bytes(bytes(tokens))
    return w["run_d"]


def _demo_out(w) -> Path:
    out = w["root"] / "demo_out"
    (out / "runs" / "ddk").mkdir(parents=True, exist_ok=True)
    (out / "runs" / "ddk" / "notes.txt").write_text("my notes")
    return out


def _report_out(w) -> Path:
    out = w["root"] / "report_out"
    out.mkdir(exist_ok=True)
    (out / "summary.md").write_text("my summary")
    return out


def _held(w) -> Path:
    run = _copy_run(w, "held")
    w["held_lock"] = FolderLock(run, "run").acquire()  # this process holds it; main() cannot
    return run


CASES = [
    (
        "corrupt student weights",
        lambda w: [
            "distill",
            write_config(
                w["root"] / "c1.yaml", w, w["root"] / "r1", **{"model.student": str(w["corrupt"])}
            ),
        ],
        ["student", "corrupt_student", "truncated or corrupt"],
    ),
    (
        "eval corrupt weights",
        lambda w: ["eval", "--model", str(w["corrupt"]), "--data", str(w["data"])],
        ["corrupt_student", "truncated or corrupt"],
    ),
    (
        "schema, data and mixture in one round",
        lambda w: [
            "distill",
            write_config(
                w["root"] / "c2.yaml",
                w,
                w["root"] / "r2",
                **{
                    "trainer.micro_batch_size": True,
                    "data.prepared": str(w["root"] / "no_data"),
                    "distill.method": "kd",
                    "distill.mixture": {"code": 0, "prose": 0},
                },
            ),
        ],
        ["3 problem(s)", "micro_batch_size", "does not exist", "every weight is 0"],
    ),
    (
        "all-zero mixture",
        lambda w: [
            "distill",
            write_config(
                w["root"] / "c3.yaml",
                w,
                w["root"] / "r3",
                **{"distill.method": "cpt", "distill.mixture": {"code": 0, "prose": 0, "math": 0}},
            ),
        ],
        ["distill.mixture", "every weight is 0"],
    ),
    (
        "bool micro_batch_size",
        lambda w: [
            "distill",
            write_config(
                w["root"] / "c4.yaml", w, w["root"] / "r4", **{"trainer.micro_batch_size": True}
            ),
        ],
        ["trainer.micro_batch_size", "integer"],
    ),
    (
        "huge K",
        lambda w: [
            "distill",
            write_config(
                w["root"] / "c5.yaml",
                w,
                w["root"] / "r5",
                **{"distill.K": 10**8, "trainer.max_steps": 10**8},
            ),
        ],
        ["400,000,000 sequences", "lower distill.K"],
    ),
    (
        "resume: edited meaning keys",
        lambda w: [
            "distill",
            "--resume",
            str(_copy_run(w, "edit", {"distill.K": 5, "trainer.seed": 1})),
        ],
        ["distill.K", "trainer.seed", "differs"],
    ),
    (
        "resume: trust_remote_code from the run folder",
        lambda w: [
            "distill",
            "--resume",
            str(_copy_run(w, "trust", {"model.trust_remote_code": True})),
        ],
        ["trust_remote_code", "--set model.trust_remote_code=true"],
    ),
    (
        "resume: trust_remote_code the checkpoint never had",
        lambda w: [
            "distill",
            "--resume",
            str(_copy_run(w, "trust2", {"model.trust_remote_code": True})),
            "--set",
            "model.trust_remote_code=true",
        ],
        ["model.trust_remote_code", "differs"],
    ),
    (
        "resume: --set of a meaning key",
        lambda w: ["distill", "--resume", str(_copy_run(w, "set")), "--set", "distill.alpha=0.1"],
        ["distill.alpha", "not allowed"],
    ),
    (
        "resume: data changed underneath",
        lambda w: ["distill", "--resume", str(_reprepared(w))],
        ["data_d", "changed since"],
    ),
    (
        "resume: a shard edited in place",
        lambda w: ["distill", "--resume", str(_shard_edited(w))],
        ["data_d", "changed since"],
    ),
    (
        "resume: folder in use",
        lambda w: ["distill", "--resume", str(_held(w))],
        ["in use by another ddk process", f"PID {os.getpid()}"],
    ),
    (
        "demo over files it did not write",
        lambda w: ["demo", "--quick", "--out", str(_demo_out(w))],
        ["demo folder", "did not write", "notes.txt"],
    ),
    (
        "report over a file it did not write",
        lambda w: ["report", str(w["base"]), "--out", str(_report_out(w))],
        ["summary.md", "did not write"],
    ),
]


@pytest.mark.parametrize("name, argv, words", CASES, ids=[c[0] for c in CASES])
def test_user_error_one_line_exit_2_nothing_changed(name, argv, words, world, capsys):
    args = argv(world)
    before = digest(world["root"])
    capsys.readouterr()
    try:
        assert main(args) == 2, name
    finally:
        if "held_lock" in world:
            world.pop("held_lock").release()
    err = error_line(capsys.readouterr().err)
    for word in words:
        assert word in err, f"{name}: {err!r} lacks {word!r}"
    assert digest(world["root"]) == before, f"{name} changed files"


def test_resume_with_allowed_set_continues_and_rebases_lr(world, capsys):
    run = _copy_run(world, "more")
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


def test_plan_covers_only_steps_that_run_and_K_above_max_steps_warns(world, capsys):
    run = world["root"] / "bigK"
    cfg = write_config(world["root"] / "bigK.yaml", world, run, **{"distill.K": 10**7})
    capsys.readouterr()
    assert main(["distill", cfg]) == 0
    assert "warning: distill.K 10000000 > trainer.max_steps 6" in capsys.readouterr().out
    plan = np.load(list_checkpoints(run)[0][1] / "plan.npy")
    assert plan.shape == (6 * 4, 2)


def test_nan_stop_without_checkpoint_does_not_claim_one(world, capsys, monkeypatch):
    original = DistillStep.forward

    def nan_forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        return out._replace(total=out.total * float("nan"))

    monkeypatch.setattr(DistillStep, "forward", nan_forward)
    run = world["root"] / "nan"
    cfg = write_config(world["root"] / "nan.yaml", world, run, **{"trainer.max_bad_steps": 1})
    capsys.readouterr()
    assert main(["distill", cfg]) == 2
    err = error_line(capsys.readouterr().err)
    assert "No checkpoint was written yet" in err and "intact" not in err
    assert not list_checkpoints(run)


@pytest.mark.slow  # two interpreter start-ups: about 17 s on 2 cores
def test_second_distill_process_on_one_folder_exits_2_naming_the_pid(world, tmp_path):
    """Two real processes: the first is paused while it holds the lock, the second is refused,
    then the first finishes normally."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", world, run)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "ddk.cli", "distill", cfg]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        lock = run / LOCK_NAME
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, "first never locked"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # a paused process still holds its flock
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        line = error_line(second.stderr)
        assert f"PID {first.pid}" in line and "in use" in line
        out, _ = first.communicate(timeout=300)
        assert first.returncode == 0, out.decode()
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait()
    assert (run / "final" / "model.safetensors").exists()


@pytest.fixture
def small_tmpfs(tmp_path, mount_tmpfs):
    return mount_tmpfs(tmp_path / "tmpfs", "size=256k")


def test_disk_full_during_checkpoint_keeps_the_last_good_one(small_tmpfs):
    run = small_tmpfs / "run"
    small = torch.nn.Linear(8, 8)
    kwargs = {"state": {}, "arrays": {"plan": np.zeros((4, 2))}, "rng_state": {}, "keep": 2}
    good = save_checkpoint(run, 1, model=small, optimizer_state={}, **kwargs)
    big = torch.nn.Linear(256, 256)  # 257 KiB of weights: more than the tmpfs holds
    opt = torch.optim.AdamW(big.parameters())
    big(torch.ones(1, 256)).sum().backward()
    opt.step()
    with pytest.raises(DDKError) as caught:
        save_checkpoint(run, 2, model=big, optimizer_state=opt.state_dict(), **kwargs)
    message = str(caught.value)
    assert "\n" not in message and "disk full" in message
    need = checkpoint_bytes(big, opt.state_dict(), kwargs["arrays"])
    assert need > 3 * 257 * 256 * 4  # weights + two Adam moments
    assert f"needs about {need / 2**20:.1f} MiB" in message
    assert verify_checkpoint(good) is None
    assert [p.name for p in (run / "checkpoints").iterdir()] == [good.name]


def test_report_replaces_only_its_own_files(world, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(world["base"]), "--out", str(out)]) == 0
    (out / "mine.txt").write_text("keep me")
    record = json.loads((out / ".ddk-report.json").read_text())
    assert "summary.md" in record["files"] and record["kind"] == "report"
    capsys.readouterr()
    assert main(["report", str(world["base"]), "--out", str(out)]) == 0
    assert "replacing the previous report" in capsys.readouterr().out
    assert (out / "mine.txt").read_text() == "keep me"


def test_demo_replaces_only_a_previous_demo(tmp_path):
    from ddk.demo.run import check_demo_folder, write_demo_record

    out = tmp_path / "demo"
    assert check_demo_folder(out) is False
    (out / "runs" / "ddk").mkdir(parents=True)
    (out / "runs" / "ddk" / "metrics.jsonl").write_text("{}\n")
    write_demo_record(out)  # as a finished (or interrupted) demo leaves it
    assert check_demo_folder(out) is True
    (out / "prepared").mkdir()
    (out / "prepared" / "user.txt").write_text("mine")
    with pytest.raises(DDKError, match="prepared/user.txt"):
        check_demo_folder(out)


def test_distill_on_a_full_disk_stops_in_one_line_and_resumes_once_freed(
    small_tmpfs, world, capsys
):
    """A real run whose second checkpoint does not fit: exit 2, the first one intact, and
    after the disk grows the run resumes from it to the end."""
    subprocess.run(["mount", "-o", "remount,size=900k", str(small_tmpfs)], check=True)
    run = small_tmpfs / "run"  # one checkpoint of the tiny student is about 570 KiB
    cfg = write_config(small_tmpfs.parent / "full.yaml", world, run)
    capsys.readouterr()
    assert main(["distill", cfg]) == 2
    err = error_line(capsys.readouterr().err)
    assert "disk full while writing checkpoint step 6" in err and "needs about" in err
    assert [s for s, _ in list_checkpoints(run)] == [3]
    assert verify_checkpoint(list_checkpoints(run)[0][1]) is None
    assert not list((run / "checkpoints").glob(".tmp-*"))
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    assert main(["distill", "--resume", str(run)]) == 0
    assert (run / "final" / "model.safetensors").exists()


def test_trust_remote_code_run_resumes_only_when_asked_again(world, capsys):
    run = world["root"] / "trusted"
    cfg = write_config(
        world["root"] / "trusted.yaml", world, run, **{"model.trust_remote_code": True}
    )
    assert main(["distill", cfg]) == 0  # the user's own config may turn it on
    capsys.readouterr()
    assert main(["distill", "--resume", str(run)]) == 2
    assert "--set model.trust_remote_code=true" in error_line(capsys.readouterr().err)
    argv = ["distill", "--resume", str(run), "--set", "model.trust_remote_code=true"]
    assert main(argv) == 0


def test_protected_differences_match_a_naive_walk():
    from ddk.config import Config
    from ddk.run_dir import SETTABLE_ON_RESUME, protected_differences

    base = Config().model_dump(mode="json")
    changed = Config().model_dump(mode="json")
    edits = {
        ("trainer", "max_steps"): 5,  # settable
        ("trainer", "lr"): 1.0,  # settable
        ("trainer", "output_dir"): "elsewhere",  # where the run lives: never compared
        ("prepare", "seq_len"): 16,  # not part of a distill run
        ("trainer", "seed"): 3,
        ("distill", "K"): 2,
        ("model", "trust_remote_code"): True,
        ("trainer", "warmup_steps"): 9,
        # settable: the trainer itself checks micro x accum x processes is unchanged
        ("trainer", "micro_batch_size"): 9,
    }
    for (section, key), value in edits.items():
        changed[section][key] = value
    naive = sorted(
        f"{s}.{k}"
        for (s, k) in edits
        if f"{s}.{k}" not in SETTABLE_ON_RESUME and k != "output_dir" and s != "prepare"
    )
    assert protected_differences(base, changed) == naive
    assert naive == [
        "distill.K",
        "model.trust_remote_code",
        "trainer.seed",
        "trainer.warmup_steps",
    ]
    del changed["teacher"]  # a section another ddk version did not have
    assert protected_differences(base, changed) == naive


def test_invalid_keys_fall_back_to_defaults_and_the_rest_is_kept():
    from ddk.preflight import drop_invalid

    raw = {
        "data": {"prepared": "x", "domains": ["a", 5]},  # a bad list item drops the list
        "trainer": {"micro_batch_size": True, "lr": 1e-5, "min_lr": 1e-3, "seed": 7},
        "distill": {"mixture": {"a": "zz"}, "K": 0, "alpha": 0.25},
        "bogus": {},
    }
    cfg = drop_invalid(raw)
    assert cfg.data.prepared == "x" and cfg.data.domains is None
    assert (cfg.trainer.micro_batch_size, cfg.trainer.min_lr, cfg.trainer.seed) == (4, 3e-6, 7)
    assert (cfg.distill.mixture, cfg.distill.K, cfg.distill.alpha) == ("natural", 1000, 0.25)
    assert raw["trainer"]["micro_batch_size"] is True  # the caller's dict is left alone
