"""Regressions found by acceptance-testing issue 8 through the CLI as a new user would: folders
that ddk did not write are never trained into, rewritten or read back as a corpus."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddk.cli import main
from ddk.data.dataset import PreparedData
from ddk.errors import DDKError


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) with its SHA-256."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def _user_folder(tmp_path: Path) -> Path:
    """A project folder holding the user's own (valid) ddk config.yaml and notes."""
    home = tmp_path / "project"
    home.mkdir()
    config = {
        "model": {"teacher": "t", "student": "s"},
        "data": {"prepared": str(tmp_path / "data")},
        "trainer": {"output_dir": str(home)},
    }
    (home / "config.yaml").write_text("# my settings\n" + yaml.safe_dump(config))
    (home / "notes.txt").write_text("mine")
    return home


def test_resume_refuses_a_folder_ddk_never_ran_in(tmp_path, capsys):
    # Before: `--resume` trained into the folder and rewrote the user's config.yaml.
    home = _user_folder(tmp_path)
    before = _tree(home)
    assert main(["distill", "--resume", str(home)]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "no run that ddk started" in err
    assert _tree(home) == before  # not even a lock file


def test_new_run_in_a_user_folder_does_not_suggest_resume(tmp_path, capsys):
    # Before: the refusal advised `ddk distill --resume`, which then trained into the folder.
    home = _user_folder(tmp_path)
    before = _tree(home)
    assert main(["distill", str(home / "config.yaml")]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "not empty" in err and "no ddk run" in err and "--resume" not in err
    assert _tree(home) == before


def test_resume_still_accepts_a_run_that_died_before_its_first_checkpoint(tmp_path, capsys):
    # The lock file is the first thing a run writes: with it, the folder is a run, and resume
    # gets past the folder check to the config checks (made to fail here, before any model).
    home = _user_folder(tmp_path)
    config = yaml.safe_load((home / "config.yaml").read_text())
    config["model"]["trust_remote_code"] = True
    (home / "config.yaml").write_text(yaml.safe_dump(config))
    (home / ".ddk.lock").write_text("1\n")
    assert main(["distill", "--resume", str(home)]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "sets model.trust_remote_code" in err


def test_prepare_refuses_an_output_inside_its_input(tmp_path, capsys):
    # Before: accepted, and the next prepare read the output's manifest.json as a JSON corpus.
    corpus = tmp_path / "corpus"
    for domain in ("a", "b"):
        (corpus / domain).mkdir(parents=True)
        (corpus / domain / "doc.txt").write_text(f"text of {domain}")
    before = _tree(corpus)
    for out in (corpus / "prepared", corpus, corpus / "a" / ".." / "x"):
        argv = ["prepare", "--input", str(corpus), "--output", str(out), "--tokenizer", "none"]
        assert main(argv) == 2
        err = _one_error_line(capsys.readouterr().err)
        assert "inside the input corpus" in err, err
        assert _tree(corpus) == before
    assert not (tmp_path / ".prepared.ddk.lock").exists()


def _data_with_a_link(tmp_path: Path, prepared_dir: Path, link_file: bool) -> tuple[Path, Path]:
    """A copy of prepared data whose first domain folder (or its val.bin) is a link to a copy
    outside the data folder. Returns (data, outside)."""
    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    folder = next(iter(json.loads((data / "manifest.json").read_text())["domains"].values()))
    inside = data / folder["folder"]
    outside = tmp_path / "elsewhere"
    if link_file:
        outside.mkdir()
        (inside / "val.bin").rename(outside / "val.bin")
        (inside / "val.bin").symlink_to(outside / "val.bin")
    else:
        inside.rename(outside)
        inside.symlink_to(outside)
    return data, outside


@pytest.mark.parametrize("link_file", [False, True], ids=["domain folder", "val.bin"])
def test_prepared_data_links_out_of_the_folder_are_refused(
    tmp_path, prepared_dir, student_dir, link_file, capsys
):
    # Before: the manifest's folder names were confined, but a link under them was followed.
    data, outside = _data_with_a_link(tmp_path, prepared_dir, link_file)
    with pytest.raises(DDKError, match="outside the prepared data folder"):
        PreparedData(data)
    assert main(["eval", "--model", str(student_dir), "--data", str(data)]) == 2
    assert str(outside) in _one_error_line(capsys.readouterr().err)


def test_prepared_data_links_inside_the_folder_still_work(tmp_path, prepared_dir):
    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    name, info = next(iter(json.loads((data / "manifest.json").read_text())["domains"].items()))
    (data / info["folder"]).rename(data / "moved")
    (data / info["folder"]).symlink_to("moved")
    assert PreparedData(data).domains[name].num_val_sequences > 0
    link = tmp_path / "data_link"  # the data folder itself may be a link
    link.symlink_to(data)
    assert PreparedData(link).domains[name].num_val_sequences > 0


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


@pytest.fixture
def tmpfs_1m(tmp_path, mount_tmpfs):
    return mount_tmpfs(tmp_path / "tmpfs", "size=1m")


def test_disk_full_while_saving_the_final_student_is_one_line(tmpfs_1m, tokenizer_dir):
    # Before: a traceback (SafetensorError, exit 1) and a `final/` holding only config.json.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddk.demo.build import tiny_causal_lm
    from ddk.final import save_final

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    run = tmpfs_1m / "run"
    run.mkdir()
    small = tiny_causal_lm(len(tokenizer), hidden_size=16, num_layers=1)  # ~50 KiB
    save_final(run, small, tokenizer)
    before = _tree(run / "final")
    big = tiny_causal_lm(len(tokenizer), hidden_size=128, num_layers=4)  # > 1 MiB of weights
    with pytest.raises(DDKError, match="disk full while saving the final student") as caught:
        save_final(run, big, tokenizer)
    assert "ddk distill --resume" in str(caught.value) and "\n" not in str(caught.value)
    assert _tree(run / "final") == before  # the previous final is whole and untouched
    assert sorted(p.name for p in run.iterdir()) == ["final"]  # no half-written folder left
    subprocess.run(["mount", "-o", "remount,size=8m", str(tmpfs_1m)], check=True)
    save_final(run, big, tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(run / "final")
    assert loaded.config.hidden_size == 128
    assert sorted(p.name for p in run.iterdir()) == ["final"]


def test_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    # Before: NotADirectoryError with a traceback, exit 1.
    home = _user_folder(tmp_path)
    mine = tmp_path / "results.txt"
    mine.write_text("mine")
    argv = ["distill", str(home / "config.yaml"), "--set", f"trainer.output_dir={mine}"]
    assert main(argv) == 2
    assert "is a file" in _one_error_line(capsys.readouterr().err)
    assert mine.read_text() == "mine"
