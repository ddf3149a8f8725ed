"""Acceptance fixes for `ddk cache-teacher` / `teacher.mode: offline` and `--auto-domains`,
found by running them as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddk.commands.cache_teacher import build_cache
from ddk.config import load_config
from ddk.data.autodomains import cluster_name
from ddk.errors import DDKError
from ddk.lock import LOCK_NAME
from ddk.preflight import preflight
from ddk.teacher import cache_format


def _cfg(teacher_dir, student_dir, prepared_dir, cache, *extra):
    return load_config(
        None,
        [
            f"model.teacher={teacher_dir}",
            f"model.student={student_dir}",
            f"data.prepared={prepared_dir}",
            f"teacher.cache={cache}",
            "teacher.cache_k=4",
            *extra,
        ],
    )


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_cache_teacher_refuses_a_file(tmp_path, teacher_dir, student_dir, prepared_dir):
    # Before: "cannot create 'afile/.ddk.lock': File exists".
    target = tmp_path / "afile"
    target.write_text("mine\n")
    with pytest.raises(DDKError, match="is a file"):
        build_cache(_cfg(teacher_dir, student_dir, prepared_dir, target), progress=False)
    assert target.read_text() == "mine\n"


def test_cache_teacher_refuses_a_folder_of_other_files(
    tmp_path, teacher_dir, student_dir, prepared_dir
):
    # Before: the shards, manifest.json and lock were written next to the user's files.
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep\n")
    with pytest.raises(DDKError, match="non-empty folder that holds no teacher cache"):
        build_cache(_cfg(teacher_dir, student_dir, prepared_dir, target), progress=False)
    assert _listing(target) == ["notes.txt"]


def test_cache_teacher_refuses_prepared_data_untouched(teacher_dir, student_dir, prepared_dir):
    # Before: refused as "a cache of another teacher..." but only after leaving a lock file in
    # the prepared folder.
    before = _listing(prepared_dir)
    with pytest.raises(DDKError, match=r"not a teacher cache \(it is prepared data\)"):
        build_cache(_cfg(teacher_dir, student_dir, prepared_dir, prepared_dir), progress=False)
    assert _listing(prepared_dir) == before
    assert LOCK_NAME not in before


def test_cache_teacher_accepts_an_empty_folder_or_one_left_by_a_kill(tmp_path, prepared_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    cache_format.check_target(empty)
    killed = tmp_path / "killed"  # killed between taking the lock and the first manifest
    killed.mkdir()
    (killed / LOCK_NAME).write_text("")
    (killed / "manifest.json.tmp").write_text("{")
    cache_format.check_target(killed)


def test_offline_run_on_prepared_data_as_cache_says_so(
    tmp_path, teacher_dir, student_dir, prepared_dir
):
    # Before: "... has cache format 2; build it again", which sends the user the wrong way.
    cfg = _cfg(
        teacher_dir,
        student_dir,
        prepared_dir,
        prepared_dir,
        "teacher.mode=offline",
        f"trainer.output_dir={tmp_path / 'run'}",
    )
    with pytest.raises(DDKError, match=r"not a teacher cache \(it is prepared data\)"):
        preflight(cfg)
    assert not (tmp_path / "run").exists()


def test_cluster_names_keep_accented_letters():
    # Before: "über" named a cluster "c1_ber".
    assert cluster_name(1, ["über", "café", "日本", "def"]) == "c1_uber_cafe_def"
    assert cluster_name(0, []) == "c0"


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


def test_offline_run_needs_no_teacher_on_this_machine(
    tmp_path, teacher_dir, student_dir, prepared_dir, capsys
):
    # Before: a run.yaml naming a teacher that only the caching machine holds was refused
    # ("cannot load ...; its weights must be on disk to fingerprint the cache"), although an
    # offline run never loads it. Now the cache is matched by the teacher's name.
    import shutil

    away = tmp_path / "teacher-elsewhere"
    shutil.copytree(teacher_dir, away)
    cache = tmp_path / "cache"
    build_cache(_cfg(away, student_dir, prepared_dir, cache), progress=False)
    shutil.rmtree(away)
    run = [f"trainer.output_dir={tmp_path / 'run'}", "teacher.mode=offline"]
    preflight(_cfg(away, student_dir, prepared_dir, cache, *run))
    assert "is not on this machine" in capsys.readouterr().out
    with pytest.raises(DDKError, match="built by another teacher"):
        preflight(_cfg(tmp_path / "other-teacher", student_dir, prepared_dir, cache, *run))
    # A teacher that is on disk is still fingerprinted: same name, other weights, refused.
    shutil.copytree(teacher_dir, away)
    (away / "config.json").write_text((away / "config.json").read_text() + " ")
    with pytest.raises(DDKError, match="built by another teacher"):
        preflight(_cfg(away, student_dir, prepared_dir, cache, *run))


def test_offline_run_says_when_the_cache_has_another_k(
    tmp_path, teacher_dir, student_dir, prepared_dir, capsys
):
    # Before: teacher.cache_k=32 against a top-4 cache trained with k = 4 without a word.
    cache = tmp_path / "cache"
    build_cache(_cfg(teacher_dir, student_dir, prepared_dir, cache), progress=False)
    run = [f"trainer.output_dir={tmp_path / 'run'}", "teacher.mode=offline"]
    preflight(_cfg(teacher_dir, student_dir, prepared_dir, cache, *run))
    assert "warning" not in capsys.readouterr().out
    preflight(_cfg(teacher_dir, student_dir, prepared_dir, cache, *run, "teacher.cache_k=32"))
    assert "holds the teacher's top-4, not teacher.cache_k=32" in capsys.readouterr().out


def test_sigterm_stops_cache_teacher_with_a_resume_hint(
    tmp_path, teacher_dir, student_dir, prepared_dir, monkeypatch, capsys
):
    # Before: SIGTERM (preemption) killed `ddk cache-teacher` silently with exit 143.
    import signal

    from ddk.cli import main

    config = {
        "model": {"teacher": str(teacher_dir), "student": str(student_dir)},
        "data": {"prepared": str(prepared_dir)},
        "teacher": {"cache": str(tmp_path / "cache"), "cache_k": 4},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    original, written = cache_format.write_shard, []

    def term_after_one(path, arrays):
        original(path, arrays)
        written.append(path)
        if len(written) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cache_format, "write_shard", term_after_one)  # the public seam
    before = signal.getsignal(signal.SIGTERM)
    assert main(["cache-teacher", str(tmp_path / "run.yaml")]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    assert len(list((tmp_path / "cache").rglob("*.bin"))) == 1
    monkeypatch.setattr(cache_format, "write_shard", original)
    assert main(["cache-teacher", str(tmp_path / "run.yaml")]) == 0


def test_rerun_on_a_finished_cache_is_a_no_op(
    tmp_path, teacher_dir, student_dir, prepared_dir, capsys
):
    # Before: a rerun loaded the teacher, recomputed every perplexity and marked the cache
    # incomplete meanwhile (so an offline run starting then was refused).
    cache = tmp_path / "cache"
    cfg = _cfg(teacher_dir, student_dir, prepared_dir, cache)
    build_cache(cfg, progress=False)
    manifest = cache / "manifest.json"
    stamp = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    capsys.readouterr()
    build_cache(cfg, progress=False)
    assert "already holds this cache; nothing to do" in capsys.readouterr().out
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == stamp
    # A missing shard is not "finished": the rerun writes it again.
    shard = sorted(cache.rglob("*.bin"))[0]
    data = shard.read_bytes()
    shard.unlink()
    build_cache(cfg, progress=False)
    assert "nothing to do" not in capsys.readouterr().out
    assert shard.read_bytes() == data


def test_a_cluster_too_small_to_hold_out_suggests_fewer_domains(tmp_path, tokenizer_dir):
    # Before: the hint named only text and seq_len, not the N that made the cluster small.
    import json
    import random

    from ddk.config import PrepareSection
    from ddk.data.prepare import prepare

    r = random.Random(0)
    words = [
        "the",
        "river",
        "town",
        "people",
        "walked",
        "along",
        "quiet",
        "morning",
        "light",
        "over",
        "old",
        "bridge",
    ]
    lines = [{"text": " ".join(r.choice(words) for _ in range(60))} for _ in range(40)]
    # the numbers cluster: three long documents, of which half the tokens hold out only one
    lines += [{"text": ", ".join(str(r.randint(0, 99999)) for _ in range(300))} for _ in range(3)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = PrepareSection(
        input=str(tmp_path / "c.jsonl"),
        output=str(tmp_path / "out"),
        seq_len=32,
        val_sequences=2,
        auto_domains=2,
    )
    with pytest.raises(DDKError, match=r"too little text.*ask for fewer domains"):
        prepare(cfg, str(tokenizer_dir), progress=False)
    assert not (tmp_path / "out").exists()
