"""NaN/inf: a bad step is skipped and logged, a run of them stops in one line with the last
good checkpoint kept, and a NaN perplexity never becomes domain weights (DDK stops; baselines
log it and go on)."""

import math

import pytest
import torch
from safetensors.torch import load_file

from ddk.checkpoint import (
    list_checkpoints,
)
from ddk.cli import main
from ddk.errors import DDKError
from ddk.metrics import read_metrics
from ddk.report import summarize_runs, write_report
from ddk.run_dir import start_run
from ddk.step import DistillStep
from ddk.trainer import Trainer
from tests.conftest import (
    long_run_config,
    make_config,
    one_error_line,
    world_config,
)

pytestmark = pytest.mark.slow


def _events(run, name):
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == name]


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
    cfg = long_run_config(tmp_path / "c.yaml", teacher_dir, student_dir, prepared_dir, run)
    assert main(["distill", str(cfg)]) == 0
    records = read_metrics(run / "metrics.jsonl")
    skipped = [r for r in records if r.get("event") == "skipped_step"]
    assert [r["step"] for r in skipped] == [8]
    assert [r for r in records if "event" not in r][-1]["bad_steps"] == 1
    assert (run / "final").exists()

    calls["n"] = 0
    bad_calls = set(range(12, 40))
    run = tmp_path / "many"
    cfg = long_run_config(
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
    cfg = long_run_config(
        tmp_path / "c.yaml", teacher_dir, student_dir, prepared_dir, tmp_path / "run"
    )
    assert main(["distill", str(cfg)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "cannot update domain weights at step 7" in err and "'code'" in err


def test_nan_stop_without_checkpoint_does_not_claim_one(world, capsys, monkeypatch):
    original = DistillStep.forward

    def nan_forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        return out._replace(total=out.total * float("nan"))

    monkeypatch.setattr(DistillStep, "forward", nan_forward)
    run = world["root"] / "nan"
    cfg = world_config(world["root"] / "nan.yaml", world, run, **{"trainer.max_bad_steps": 1})
    capsys.readouterr()
    assert main(["distill", cfg]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "No checkpoint was written yet" in err and "intact" not in err
    assert not list_checkpoints(run)


# ----------------------------------------------------------------------------- NaN evaluation
@pytest.fixture
def nan_student(tmp_path, student_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    path = tmp_path / "nan_student"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(path)
    return path


def test_nan_evaluation_in_kd_is_logged_and_the_run_goes_on(
    tmp_path, teacher_dir, nan_student, prepared_dir, capsys
):
    overrides = {"trainer.max_steps": 4, "distill.K": 2, "trainer.max_bad_steps": 100}
    run = tmp_path / "kd"
    cfg = make_config(run, teacher_dir, nan_student, prepared_dir,
                      **{"distill.method": "kd", **overrides})  # fmt: skip
    assert start_run(cfg) is not None
    assert "does not use it, logged as NaN" in capsys.readouterr().out
    updates, final = _events(run, "domain_update"), _events(run, "final_eval")
    assert len(updates) == 2 and len(final) == 1
    assert all(math.isnan(e["student_ppl"]) for e in final[0]["domains"].values())
    assert math.isnan(summarize_runs([run])["runs"][0]["geomean_ppl"])
    write_report([run], tmp_path / "report")  # the report copes with NaN
    # ddk steers by the perplexities: it stops with the clear message instead
    cfg = make_config(tmp_path / "ddk", teacher_dir, nan_student, prepared_dir, **overrides)
    with pytest.raises(DDKError, match="cannot update domain weights at step 0"):
        start_run(cfg)
