"""One run per run folder, never trained into a folder ddk did not start, and ddk replaces
only the files it wrote (report and demo folders)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddk.cli import main
from ddk.errors import DDKError
from ddk.lock import LOCK_NAME
from ddk.run_dir import start_run
from tests.conftest import (
    make_config,
    one_error_line,
    tree_digest,
    user_folder,
    world_config,
)


def test_new_run_in_a_user_folder_does_not_suggest_resume(tmp_path, capsys):
    # Before: the refusal advised `ddk distill --resume`, which then trained into the folder.
    home = user_folder(tmp_path)
    before = tree_digest(home)
    assert main(["distill", str(home / "config.yaml")]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "not empty" in err and "no ddk run" in err and "--resume" not in err
    assert tree_digest(home) == before


def test_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    # Before: NotADirectoryError with a traceback, exit 1.
    home = user_folder(tmp_path)
    mine = tmp_path / "results.txt"
    mine.write_text("mine")
    argv = ["distill", str(home / "config.yaml"), "--set", f"trainer.output_dir={mine}"]
    assert main(argv) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err)
    assert mine.read_text() == "mine"


@pytest.mark.slow
def test_refuses_non_empty_run_dir(tmp_path, teacher_dir, student_dir, prepared_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    cfg = make_config(run, teacher_dir, student_dir, prepared_dir)
    with pytest.raises(DDKError, match="not empty and holds no ddk run") as e:
        start_run(cfg)
    assert "--resume" not in str(e.value)  # resuming would not help in the user's folder
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.slow  # two interpreter start-ups: about 17 s on 2 cores
def test_second_distill_process_on_one_folder_exits_2_naming_the_pid(world, tmp_path):
    """Two real processes: the first is paused while it holds the lock, the second is refused,
    then the first finishes normally."""
    run = tmp_path / "run"
    cfg = world_config(tmp_path / "c.yaml", world, run)
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
        line = one_error_line(second.stderr)
        assert f"PID {first.pid}" in line and "in use" in line
        out, _ = first.communicate(timeout=300)
        assert first.returncode == 0, out.decode()
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait()
    assert (run / "final" / "model.safetensors").exists()


@pytest.mark.slow
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


def _outside_file(tmp_path: Path) -> Path:
    mine = tmp_path / "elsewhere" / "mine.md"
    mine.parent.mkdir()
    mine.write_text("# my notes\n")
    return mine


def test_demo_refuses_a_symlinked_file_or_folder_it_recorded(tmp_path):
    """A demo re-run replaces only what it wrote: never through a link the user put there,
    even under a name its record lists (results.md, runs/)."""
    from ddk.demo.run import check_demo_folder, write_demo_record

    mine = _outside_file(tmp_path)
    out = tmp_path / "demo"
    (out / "runs" / "ddk").mkdir(parents=True)
    (out / "results.md").write_text("table\n")
    write_demo_record(out)
    (out / "results.md").unlink()
    (out / "results.md").symlink_to(mine)
    with pytest.raises(DDKError, match=r"symlink \(results.md\)"):
        check_demo_folder(out)
    (out / "results.md").unlink()
    (out / "results.md").write_text("table\n")
    (out / "runs").rename(tmp_path / "elsewhere" / "runs")
    (out / "runs").symlink_to(tmp_path / "elsewhere" / "runs")
    with pytest.raises(DDKError, match=r"symlink \(runs\)"):
        check_demo_folder(out)
    assert (tmp_path / "elsewhere" / "runs" / "ddk").is_dir()
    assert mine.read_text() == "# my notes\n"


def test_report_refuses_a_symlinked_file_it_recorded(tmp_path):
    from ddk.ownership import ownership_record
    from ddk.report import REPORT_FILES, REPORT_RECORD, _check_report_folder

    mine = _outside_file(tmp_path)
    out = tmp_path / "rep"
    out.mkdir()
    (out / REPORT_RECORD).write_text(json.dumps(ownership_record("report", REPORT_FILES)))
    (out / "summary.md").symlink_to(mine)
    with pytest.raises(DDKError, match=r"symlink \(summary.md\)"):
        _check_report_folder(out)


def test_resume_refuses_a_symlinked_config(tmp_path, capsys):
    """config.yaml linked to a user's file: resuming would rewrite it (losing its comments)."""
    home = user_folder(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    (run / "config.yaml").symlink_to(home / "config.yaml")
    before = (home / "config.yaml").read_text()
    assert main(["distill", "--resume", str(run)]) == 2
    assert "symlink (config.yaml)" in one_error_line(capsys.readouterr().err)
    assert (home / "config.yaml").read_text() == before


def test_overwrite_refuses_an_output_that_is_a_symlink(tmp_path):
    from ddk.ownership import check_replaceable, ownership_record

    real = tmp_path / "real"
    real.mkdir()
    (real / "a.bin").write_bytes(b"x")
    link = tmp_path / "data"
    link.symlink_to(real)
    record = ownership_record("prepared", ["a.bin"])
    with pytest.raises(DDKError, match="is a symlink"):
        check_replaceable(link, record, "prepared", f"output '{link}'")
    assert link.is_symlink() and (real / "a.bin").read_bytes() == b"x"
