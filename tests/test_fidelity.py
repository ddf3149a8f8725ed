"""Method fidelity and honest evaluation: the test split in final numbers, the opt-in floor at
interval 0, what the sampler did, baselines that survive a NaN evaluation, teacher perplexities
computed once per (data, teacher), and the opt-in τ² factor."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ddk.data.dataset import PreparedData
from ddk.domains import Steering, floored_initial_weights, next_weights
from ddk.errors import DDKError
from ddk.evaluate import domain_perplexities
from ddk.metrics import read_metrics
from ddk.models import load_model
from ddk.report import summarize_runs, write_report
from ddk.run_dir import start_run
from ddk.step import DistillStep
from ddk.trainer import Trainer
from tests.conftest import make_config, with_test_split


def _events(run, name):
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == name]


# ----------------------------------------------------------------------------- init_floor
def test_floored_initial_weights_match_naive_reference():
    s, t, alpha = [30.0, 12.0, 900.0], [10.0, 11.0, 100.0], 0.5
    x = [a / b for a, b in zip(s, t)]
    z = sum(math.exp(v) for v in x)
    naive = [alpha * math.exp(v) / z + (1 - alpha) / 3 for v in x]
    got = floored_initial_weights(s, t, alpha)
    np.testing.assert_allclose(got, naive, rtol=1e-12)
    assert got.sum() == pytest.approx(1.0) and got.min() >= (1 - alpha) / 3
    floored = next_weights("ddk", 0, None, s, t, alpha, None, steering=Steering(init_floor=True))
    np.testing.assert_allclose(floored, naive, rtol=1e-12)
    plain = next_weights("ddk", 0, None, s, t, alpha, None)  # the paper: no floor
    assert plain.min() < 1e-3
    # later intervals are Eq. 2 either way
    later = [
        next_weights("ddk", 1, plain, s, t, alpha, None, steering=Steering(init_floor=f))
        for f in (False, True)
    ]
    np.testing.assert_array_equal(*later)


@pytest.mark.slow  # an end-to-end run
def test_final_numbers_come_from_the_test_split(tmp_path, teacher_dir, student_dir, prepared_dir):
    data_dir = with_test_split(prepared_dir, tmp_path / "data")
    run = tmp_path / "run"
    cfg = make_config(run, teacher_dir, student_dir, data_dir, **{"trainer.max_steps": 3})
    final = start_run(cfg)
    data = PreparedData(data_dir)
    record = _events(run, "final_eval")[0]
    assert record["split"] == "test"
    student = domain_perplexities(load_model(str(final), dtype=torch.float32, what="s"), data,
                                  vocab_size=data.vocab_size, split="test")  # fmt: skip
    teacher = load_model(str(teacher_dir), dtype=torch.float32, what="t")
    t_test = domain_perplexities(teacher, data, vocab_size=data.vocab_size, split="test")
    t_val = domain_perplexities(teacher, data, vocab_size=data.vocab_size, split="val")
    before = load_model(str(student_dir), dtype=torch.float32, what="s")
    s_before = domain_perplexities(before, data, vocab_size=data.vocab_size, split="test")
    first_update = _events(run, "domain_update")[0]
    for d, e in record["domains"].items():
        assert e["student_ppl"] == pytest.approx(student[d]["ppl"], rel=1e-4)
        assert e["teacher_ppl"] == pytest.approx(t_test[d]["ppl"], rel=1e-5)
        assert e["student_before_ppl"] == pytest.approx(s_before[d]["ppl"], rel=1e-5)
        # the curves stay on the validation split DDK steers by
        assert first_update["domains"][d]["teacher_ppl"] == pytest.approx(t_val[d]["ppl"], rel=1e-5)
        assert abs(t_test[d]["ppl"] - t_val[d]["ppl"]) > 1e-3 * t_val[d]["ppl"]
    summary = summarize_runs([run])
    assert summary["split"] == "test"
    assert summary["teacher"] == {d: e["teacher_ppl"] for d, e in record["domains"].items()}
    assert summary["before"] == {d: e["student_before_ppl"] for d, e in record["domains"].items()}
    page = write_report([run], tmp_path / "report")
    assert "held-out test split" in (page.parent / "summary.md").read_text()


# ----------------------------------------------------------------------------- the sampler
@pytest.mark.slow  # an end-to-end run
def test_starved_and_repeated_domains_are_reported(
    tmp_path, teacher_dir, student_dir, prepared_dir, capsys
):
    run = tmp_path / "run"
    cfg = make_config(
        run,
        teacher_dir,
        student_dir,
        prepared_dir,
        **{
            "distill.method": "kd",
            "distill.mixture": "{code: 1.0}",
            "distill.K": 1000,
            "distill.max_domain_epochs": 1,
            # one step of 800 sequences (only the steps that run are planned): passes over 'code'
            "trainer.micro_batch_size": 100,
            "trainer.grad_accum_steps": 8,
            "trainer.max_steps": 1,
        },
    )
    start_run(cfg)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: domain")]
    assert any("'prose' gets 0 of 800 sequences in interval 0" in w for w in warnings)
    assert any("'math' gets 0 of 800" in w for w in warnings)
    assert sum("'code' has been repeated" in w for w in warnings) == 1
    update = _events(run, "domain_update")[0]["domains"]
    assert update["code"]["rows"] == 800 and update["prose"]["rows"] == 0
    sizes = PreparedData(prepared_dir).domains["code"].num_train_sequences
    assert update["code"]["epochs"] == 800 // sizes > 1
    assert update["math"]["epochs"] == 0
    summary = write_report([run], tmp_path / "report").parent / "summary.md"
    assert "Epochs per domain" in summary.read_text()


# ----------------------------------------------------------------------------- teacher ppl cache
@pytest.mark.slow  # an end-to-end run
def test_teacher_perplexities_computed_once_for_three_runs(
    tmp_path, teacher_dir, student_dir, prepared_dir
):
    sources, ppls = [], []
    for method in ("cpt", "kd", "ddk"):
        run = tmp_path / method
        cfg = make_config(
            run,
            teacher_dir,
            student_dir,
            prepared_dir,
            **{
                "distill.method": method,
                "trainer.max_steps": 1,
                "teacher.ppl_cache_dir": str(tmp_path / "cache"),
            },
        )
        trainer = Trainer(cfg, run)
        if method == "cpt":
            assert trainer.teacher_model is None  # cpt needs no teacher for training
        trainer.train()
        saved = json.loads((run / "teacher_ppl.json").read_text())
        sources.append(saved["source"]["val"])
        ppls.append(saved["ppl"]["val"])
        final = _events(run, "final_eval")[0]
        assert all(e["teacher_ppl"] is not None for e in final["domains"].values())
    assert sources == ["computed", "cache", "cache"]
    assert ppls[0] == ppls[1] == ppls[2]
    assert len(list((tmp_path / "cache").glob("*-*.json"))) == 1


# ----------------------------------------------------------------------------- tau_squared
def test_tau_squared_scales_the_divergence(teacher_dir, student_dir, prepared_dir, tmp_path):
    from ddk.teacher import Batch
    from ddk.teacher.online import OnlineTeacher

    data = PreparedData(prepared_dir)
    student = load_model(str(student_dir), dtype=torch.float32, what="s")
    teacher = OnlineTeacher(load_model(str(teacher_dir), dtype=torch.float32, what="t"))
    seqs = data.domains["prose"].sequences("train", [0, 1])
    sig = teacher.signal(Batch(seqs[:, :-1], None))
    outs = {}
    for flag in (False, True):
        cfg = make_config(tmp_path, teacher_dir, student_dir, prepared_dir,
                          **{"distill.tau": 2.0, "distill.tau_squared": flag})  # fmt: skip
        step = DistillStep(student, cfg, data.vocab_size)
        outs[flag] = step(seqs[:, :-1], seqs[:, 1:], sig)
    plain, hinton = outs[False], outs[True]
    assert plain.div.item() == pytest.approx(hinton.div.item(), rel=1e-6) and plain.div > 0
    # float32 sums of a few hundred nats: compare totals, not their small differences
    assert plain.total.item() == pytest.approx((plain.ce + 0.2 * plain.div).item(), rel=1e-6)
    assert hinton.total.item() == pytest.approx((hinton.ce + 0.8 * hinton.div).item(), rel=1e-6)
    assert (hinton.total - plain.total).item() == pytest.approx(0.6 * plain.div.item(), rel=1e-3)


@pytest.mark.slow  # an end-to-end run
def test_init_floor_run_is_labelled_and_floored(tmp_path, teacher_dir, student_dir, prepared_dir):
    from ddk.demo.run import split_variant

    run = tmp_path / "floor"
    cfg = make_config(run, teacher_dir, student_dir, prepared_dir,
                      **{"distill.init_floor": True, "trainer.max_steps": 1})  # fmt: skip
    start_run(cfg)
    first = _events(run, "domain_update")[0]["domains"]
    names = list(first)
    s = [first[d]["student_ppl"] for d in names]
    t = [first[d]["teacher_ppl"] for d in names]
    expected = floored_initial_weights(s, t, 0.5)
    np.testing.assert_allclose([first[d]["weight"] for d in names], expected, rtol=1e-9)
    assert min(first[d]["rows"] for d in names) > 0
    assert summarize_runs([run])["runs"][0]["label"] == "ddk+floor"
    assert split_variant("ddk+floor") == ("ddk", "floor") and split_variant("kd") == ("kd", "")
    assert split_variant("ddk+robust") == ("ddk", "robust")  # a preset is a variant too
    for bad in ("kd+floor", "kd+robust", "ddk+tau", "dkk"):
        with pytest.raises(DDKError, match="ddk\\+floor"):
            split_variant(bad)


def test_steering_keys_reach_the_run(tmp_path, teacher_dir, student_dir, prepared_dir):
    """A run with a preset and steering keys samples with exactly those weights, and its saved
    config and report label say what it ran."""
    import yaml

    from ddk.config import load_config

    run = tmp_path / "robust"
    keys = {"distill.preset": "robust", "distill.gap": "log_ratio", "distill.min_share": 0.5,
            "distill.max_weight_change": 1.5, "distill.gap_trend": 1.0, "distill.K": 2,
            "trainer.max_steps": 6}  # fmt: skip
    cfg = make_config(run, teacher_dir, student_dir, prepared_dir, **keys)
    start_run(cfg)
    saved = load_config(run / "config.yaml").distill
    assert saved == cfg.distill and saved.preset == "robust" and saved.gap == "log_ratio"
    assert yaml.safe_load((run / "config.yaml").read_text())["distill"]["init_floor"] is True
    updates = _events(run, "domain_update")
    assert [u["step"] for u in updates] == [0, 2, 4]
    previous, last_ppl = None, None
    for i, update in enumerate(updates):
        names = list(update["domains"])
        s = [update["domains"][d]["student_ppl"] for d in names]
        t = [update["domains"][d]["teacher_ppl"] for d in names]
        expected = next_weights("ddk", i, previous, s, t, saved.alpha, None, names,
                                saved.steering(), last_ppl)  # fmt: skip
        got = [update["domains"][d]["weight"] for d in names]
        np.testing.assert_allclose(got, expected, rtol=1e-9)
        assert min(got) >= 0.5 / len(names) - 1e-12
        previous, last_ppl = got, s
    # the trend changed something: without the last perplexities interval 2 differs
    r1 = [updates[1]["domains"][d]["weight"] for d in names]
    blind = next_weights("ddk", 2, r1, s, t, saved.alpha, None, names, saved.steering())
    assert not np.allclose(blind, got)
    assert summarize_runs([run])["runs"][0]["label"] == "ddk+robust"
