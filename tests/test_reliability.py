"""Crash safety: kills, SIGTERM, corrupt checkpoints, NaN steps, and bad inputs answered clearly."""

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ddk.checkpoint import list_checkpoints
from ddk.cli import main
from ddk.metrics import read_metrics
from ddk.run_dir import resume_run, start_run
from ddk.step import DistillStep
from ddk.trainer import Trainer

BASE = {
    "trainer.max_steps": 40,
    "trainer.micro_batch_size": 4,
    "trainer.lr": 3e-3,
    "trainer.min_lr": 3e-4,
    "trainer.warmup_steps": 2,
    "trainer.log_every": 5,
    "trainer.save_every": 5,
    "trainer.keep_checkpoints": 3,
    "trainer.eval_batch_size": 4,
    "distill.K": 7,
}


def write_config(path: Path, teacher, student, prepared, run_dir, **extra) -> Path:
    data: dict = {}
    items = {
        "model.teacher": str(teacher),
        "model.student": str(student),
        "data.prepared": str(prepared),
        "trainer.output_dir": str(run_dir),
        **BASE,
        **extra,
    }
    for key, value in items.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    path.write_text(yaml.safe_dump(data))
    return path


def ddk_process(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ddk.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def error_line(stderr: str) -> str:
    """The one error line (progress bars may share stderr)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def final_state(run: Path):
    weights = load_file(run / "final" / "model.safetensors")
    final = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "final_eval"][-1]
    domain_weights = {d: v["weight"] for d, v in final["domains"].items()}
    return weights, domain_weights, (run / "final" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, teacher_dir, student_dir, prepared_dir):
    root = tmp_path_factory.mktemp("reference")
    cfg = write_config(root / "c.yaml", teacher_dir, student_dir, prepared_dir, root / "run")
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
    cfg = write_config(tmp_path / "c.yaml", teacher_dir, student_dir, prepared_dir, run)
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
    cfg = write_config(tmp_path / "c.yaml", teacher_dir, student_dir, prepared_dir, run)
    proc = ddk_process("distill", str(cfg))
    _wait_for_checkpoint(run, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    if "SIGTERM received" in out:  # (the run may have finished before the signal landed)
        assert f"ddk distill --resume {run}" in out
        assert not (run / "final").exists()
        step = list_checkpoints(run)[0][0]
        assert step < BASE["trainer.max_steps"]
        assert main(["distill", "--resume", str(run)]) == 0
    weights, domains, _ = final_state(run)
    ref_weights, ref_domains, _ = final_state(reference_run)
    assert domains == ref_domains
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def test_corrupt_newest_checkpoint_falls_back(
    tmp_path, teacher_dir, student_dir, prepared_dir, capsys, crash_at_step
):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", teacher_dir, student_dir, prepared_dir, run)
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
    cfg = write_config(tmp_path / "c.yaml", teacher_dir, student_dir, prepared_dir, run)
    real_rename = Path.rename

    def die_on_second_checkpoint(self, target):
        if self.name.startswith(".tmp-step-00000010"):
            raise KeyboardInterrupt  # the process dies between writing and publishing
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", die_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        start_run(write_and_load(cfg))
    monkeypatch.setattr(Path, "rename", real_rename)
    assert [s for s, _ in list_checkpoints(run)] == [5]
    assert list((run / "checkpoints").glob(".tmp-step-*"))
    resume_run(run)
    assert not list((run / "checkpoints").glob(".tmp-step-*"))
    weights, domains, _ = final_state(run)
    ref_weights, ref_domains, _ = final_state(reference_run)
    assert domains == ref_domains and all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def write_and_load(path):
    from ddk.config import load_config

    return load_config(path)


def test_nan_step_is_skipped_and_a_run_of_nans_stops(
    tmp_path, teacher_dir, student_dir, prepared_dir, monkeypatch
):
    calls = {"n": 0}
    original = DistillStep.forward

    def nan_forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            out = out._replace(total=out.total * float("nan"))
        return out

    monkeypatch.setattr(DistillStep, "forward", nan_forward)
    bad_calls = {8}  # one micro-batch forward (micro_batch 4, accum 1: one per step)
    run = tmp_path / "one"
    cfg = write_config(tmp_path / "c.yaml", teacher_dir, student_dir, prepared_dir, run)
    assert main(["distill", str(cfg)]) == 0
    records = read_metrics(run / "metrics.jsonl")
    skipped = [r for r in records if r.get("event") == "skipped_step"]
    assert [r["step"] for r in skipped] == [8]
    assert [r for r in records if "event" not in r][-1]["bad_steps"] == 1
    assert (run / "final").exists()

    calls["n"] = 0
    bad_calls = set(range(12, 40))
    run = tmp_path / "many"
    cfg = write_config(
        tmp_path / "c2.yaml",
        teacher_dir,
        student_dir,
        prepared_dir,
        run,
        **{"trainer.max_bad_steps": 3},
    )
    assert main(["distill", str(cfg)]) == 2
    steps = [s for s, _ in list_checkpoints(run)]
    assert steps == [10, 5]
    before = load_file(list_checkpoints(run)[0][1] / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in before.values())
    assert not (run / "final").exists()


def test_nan_domain_perplexity_cannot_poison_weights(
    tmp_path, teacher_dir, student_dir, prepared_dir, monkeypatch, capsys
):
    original = Trainer.evaluate_student

    def nan_eval(self):
        result = original(self)
        if self.state.step > 0:
            result["code"]["ppl"] = float("nan")
        return result

    monkeypatch.setattr(Trainer, "evaluate_student", nan_eval)
    cfg = write_config(
        tmp_path / "c.yaml", teacher_dir, student_dir, prepared_dir, tmp_path / "run"
    )
    assert main(["distill", str(cfg)]) == 2
    err = error_line(capsys.readouterr().err)
    assert "cannot update domain weights at step 7" in err and "'code'" in err


# ---------------------------------------------------------------- bad inputs, table-driven


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def bad_input_world(
    tmp_path_factory, teacher_dir, student_dir, prepared_dir, tokenizer_dir, save_model
):
    from ddk.config import PrepareSection
    from ddk.data.prepare import prepare
    from ddk.demo.build import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("bad")
    other_tok = train_bpe_tokenizer(
        [f"other words {i} " * 30 for i in range(50)], 320, root / "other_tok"
    )
    other = save_model(root / "other_model", other_tok)
    short = save_model(root / "short_ctx", tokenizer_dir, max_positions=16)
    other_data = root / "other_data"
    corpus = root / "c"
    (corpus / "a").mkdir(parents=True)
    for i in range(20):
        (corpus / "a" / f"x{i}.txt").write_text(f"other words here {i} " * 20)
    prepare(
        PrepareSection(input=str(corpus), output=str(other_data), seq_len=16, val_sequences=2),
        str(other_tok),
        progress=False,
    )
    existing_run = root / "existing_run"
    existing_run.mkdir()
    (existing_run / "metrics.jsonl").write_text('{"step": 1}\n')
    return {
        "root": root,
        "teacher": teacher_dir,
        "student": student_dir,
        "data": prepared_dir,
        "other_model": other,
        "short": short,
        "other_data": other_data,
        "existing_run": existing_run,
    }


def _cfg(w, name, **extra):
    base = {
        "model.teacher": w["teacher"],
        "model.student": w["student"],
        "data.prepared": w["data"],
        "trainer.output_dir": w["root"] / f"run_{name}",
    }
    base.update(extra)
    data: dict = {}
    for key, value in base.items():
        section, field = key.split(".")
        data.setdefault(section, {})[field] = str(value) if isinstance(value, Path) else value
    path = w["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


BAD_INPUTS = [
    (
        "unknown key",
        lambda w: ["distill", _cfg(w, "k", **{"distill.gama": 0.1})],
        ["unknown key 'distill.gama'"],
    ),
    (
        "wrong type",
        lambda w: ["distill", _cfg(w, "t", **{"trainer.max_steps": "ten"})],
        ["trainer.max_steps"],
    ),
    (
        "gamma < 0",
        lambda w: ["distill", _cfg(w, "g", **{"distill.gamma": -0.5})],
        ["distill.gamma"],
    ),
    ("alpha > 1", lambda w: ["distill", _cfg(w, "a", **{"distill.alpha": 1.5})], ["distill.alpha"]),
    ("K < 1", lambda w: ["distill", _cfg(w, "K", **{"distill.K": 0})], ["distill.K"]),
    (
        "missing domain",
        lambda w: ["distill", _cfg(w, "d", **{"data.domains": ["code", "poetry"]})],
        ["data.domains", "'poetry'"],
    ),
    (
        "mixture domain",
        lambda w: [
            "distill",
            _cfg(w, "m", **{"distill.method": "kd", "distill.mixture": {"law": 1}}),
        ],
        ["distill.mixture", "'law'"],
    ),
    (
        "seq_len > context",
        lambda w: ["distill", _cfg(w, "s", **{"model.student": w["short"]})],
        ["seq_len 32 exceeds the student's context of 16"],
    ),
    (
        "vocab mismatch",
        lambda w: ["distill", _cfg(w, "v", **{"model.teacher": w["other_model"]})],
        ["model.teacher", "vocabulary mismatch"],
    ),
    (
        "data from another tokenizer",
        lambda w: ["distill", _cfg(w, "o", **{"data.prepared": w["other_data"]})],
        ["data.prepared", "differs from the student"],
    ),
    (
        "prepared missing",
        lambda w: ["distill", _cfg(w, "p", **{"data.prepared": w["root"] / "nope"})],
        ["data.prepared", "does not exist"],
    ),
    (
        "student path missing",
        lambda w: ["distill", _cfg(w, "sp", **{"model.student": "./no/such/model"})],
        ["model.student", "does not exist"],
    ),
    (
        "teacher required",
        lambda w: ["distill", _cfg(w, "tr", **{"model.teacher": None})],
        ["model.teacher: required"],
    ),
    (
        "config file missing",
        lambda w: ["distill", str(w["root"] / "missing.yaml")],
        ["does not exist"],
    ),
    (
        "run dir not empty",
        lambda w: ["distill", _cfg(w, "e", **{"trainer.output_dir": w["existing_run"]})],
        ["not empty", "--resume"],
    ),
    (
        "resume without run",
        lambda w: ["distill", "--resume", str(w["root"] / "nothing")],
        ["holds no run"],
    ),
    (
        "eval missing model",
        lambda w: ["eval", "--model", "./no/model", "--data", str(w["data"])],
        ["does not exist"],
    ),
    (
        "eval data missing",
        lambda w: ["eval", "--model", str(w["student"]), "--data", str(w["root"] / "x")],
        ["does not exist"],
    ),
    ("report missing run", lambda w: ["report", str(w["root"] / "norun")], ["does not exist"]),
    (
        "eval other vocabulary",
        lambda w: ["eval", "--model", str(w["other_model"]), "--data", str(w["data"])],
        ["vocabulary differs"],
    ),
    (
        "empty domain list",
        lambda w: ["distill", _cfg(w, "ed", **{"data.domains": []})],
        ["data.domains: empty"],
    ),
]


@pytest.mark.parametrize("name, argv, words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_one_line_exit_2_nothing_modified(name, argv, words, bad_input_world, capsys):
    w = bad_input_world
    args = argv(w)
    watched = [w["data"], w["existing_run"], w["teacher"], w["student"]]
    before = [_tree_digest(p) for p in watched]
    capsys.readouterr()
    assert main(args) == 2, name
    err = error_line(capsys.readouterr().err)
    for word in words:
        assert word in err, f"{name}: {err!r} lacks {word!r}"
    assert [_tree_digest(p) for p in watched] == before
    run_dir = w["root"] / f"run_{name}"
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_preflight_reports_every_problem_at_once(bad_input_world, capsys):
    w = bad_input_world
    cfg = _cfg(
        w,
        "many",
        **{
            "data.domains": ["poetry"],
            "model.teacher": w["other_model"],
            "model.student": w["short"],
        },
    )
    assert main(["distill", cfg]) == 2
    err = capsys.readouterr().err
    assert (
        "problem(s)" in err
        and "data.domains" in err
        and "model.teacher" in err
        and "context of 16" in err
    )


def test_stale_temp_checkpoint_is_cleaned(tmp_path):
    from ddk.checkpoint import save_checkpoint

    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000003-999").mkdir(parents=True)
    model = torch.nn.Linear(2, 2)
    save_checkpoint(
        tmp_path, 4, model=model, optimizer_state={}, state={}, arrays={}, rng_state={}, keep=2
    )
    assert not (root / ".tmp-step-00000003-999").exists()
    shutil.rmtree(root)
