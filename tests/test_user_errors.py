"""Every error a user can cause, answered in one line with exit 2 before anything is written
(no file in the data, models or run folders changes), and all of a config's problems at once."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ddk.checkpoint import (
    list_checkpoints,
)
from ddk.cli import main
from ddk.lock import LOCK_NAME, FolderLock
from ddk.preflight import drop_invalid
from tests.conftest import (
    copy_run,
    one_error_line,
    run_config,
    tree_digest,
    world_config,
    write_config,
)

pytestmark = pytest.mark.slow


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
    """A config file of the bad-input world's models and data, with `extra` (maybe invalid)."""
    values = run_config(
        w["root"] / f"run_{name}", w["teacher"], w["student"], w["data"], base={}, **extra
    )
    return write_config(w["root"] / f"{name}.yaml", values)


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
    before = [tree_digest(p) for p in watched]
    capsys.readouterr()
    assert main(args) == 2, name
    err = one_error_line(capsys.readouterr().err)
    for word in words:
        assert word in err, f"{name}: {err!r} lacks {word!r}"
    assert [tree_digest(p) for p in watched] == before
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
    run = copy_run(w, "held")
    w["held_lock"] = FolderLock(run, "run").acquire()  # this process holds it; main() cannot
    return run


CASES = [
    (
        "corrupt student weights",
        lambda w: [
            "distill",
            world_config(
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
            world_config(
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
            world_config(
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
            world_config(
                w["root"] / "c4.yaml", w, w["root"] / "r4", **{"trainer.micro_batch_size": True}
            ),
        ],
        ["trainer.micro_batch_size", "integer"],
    ),
    (
        "huge K",
        lambda w: [
            "distill",
            world_config(
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
            str(copy_run(w, "edit", {"distill.K": 5, "trainer.seed": 1})),
        ],
        ["distill.K", "trainer.seed", "differs"],
    ),
    (
        "resume: trust_remote_code from the run folder",
        lambda w: [
            "distill",
            "--resume",
            str(copy_run(w, "trust", {"model.trust_remote_code": True})),
        ],
        ["trust_remote_code", "--set model.trust_remote_code=true"],
    ),
    (
        "resume: trust_remote_code the checkpoint never had",
        lambda w: [
            "distill",
            "--resume",
            str(copy_run(w, "trust2", {"model.trust_remote_code": True})),
            "--set",
            "model.trust_remote_code=true",
        ],
        ["model.trust_remote_code", "differs"],
    ),
    (
        "resume: --set of a meaning key",
        lambda w: ["distill", "--resume", str(copy_run(w, "set")), "--set", "distill.alpha=0.1"],
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
    before = tree_digest(world["root"], ignore=(LOCK_NAME,))
    capsys.readouterr()
    try:
        assert main(args) == 2, name
    finally:
        if "held_lock" in world:
            world.pop("held_lock").release()
    err = one_error_line(capsys.readouterr().err)
    for word in words:
        assert word in err, f"{name}: {err!r} lacks {word!r}"
    assert tree_digest(world["root"], ignore=(LOCK_NAME,)) == before, f"{name} changed files"


def test_plan_covers_only_steps_that_run_and_K_above_max_steps_warns(world, capsys):
    run = world["root"] / "bigK"
    cfg = world_config(world["root"] / "bigK.yaml", world, run, **{"distill.K": 10**7})
    capsys.readouterr()
    assert main(["distill", cfg]) == 0
    assert "warning: distill.K 10000000 > trainer.max_steps 6" in capsys.readouterr().out
    plan = np.load(list_checkpoints(run)[0][1] / "plan.npy")
    assert plan.shape == (6 * 4, 2)


def test_invalid_keys_fall_back_to_defaults_and_the_rest_is_kept():
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
