"""benchmarks/method_sweep.py: reads final_eval records, aggregates over seeds, compares with
the reference setting, and (slow) runs a real tiny sweep end to end, resumably."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from ddk.config import Config
from ddk.errors import DDKError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "method_sweep.py"
_spec = importlib.util.spec_from_file_location("method_sweep", SCRIPT)
sweep = sys.modules.setdefault("method_sweep", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(sweep)  # dataclasses look their module up in sys.modules


def fake_run(
    run_dir: Path, student: dict, teacher: dict, split="test", stale=None, bench=None
) -> Path:
    """A run folder as `ddk distill` leaves it: training logs, domain updates, one final_eval
    (after a `stale` one from before a resume, if given), and with `bench` (an lm-eval average)
    a mid-run and a final benchmark_eval."""
    run_dir.mkdir(parents=True)

    def event(name, ppl, step):
        return {"event": name, "step": step, "split": split, "domains": {
            d: {"student_ppl": ppl[d], "teacher_ppl": teacher[d], "ratio": ppl[d] / teacher[d],
                "weight": 0.5} for d in ppl}}  # fmt: skip

    records = [{"step": 1, "loss": 3.0}, event("domain_update", {d: 99.0 for d in student}, 0)]
    if stale:
        records.append(event("final_eval", stale, 4))
    records += [{"step": 4, "loss": 2.0}, event("final_eval", student, 4)]
    if bench is not None:
        records += [{"event": "benchmark_eval", "step": s, "final": s == 4, "average": a}
                    for s, a in ((2, 0.01), (4, bench))]  # fmt: skip
    records.append("{truncated")
    (run_dir / "metrics.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    )
    return run_dir


TEACHER = {"code": 10.0, "math": 5.0, "prose": 20.0}


def test_run_numbers_reads_the_last_final_eval(tmp_path):
    run = fake_run(tmp_path / "r", {"code": 30.0, "math": 20.0, "prose": 40.0}, TEACHER,
                   stale={"code": 1.0, "math": 1.0, "prose": 1.0})  # fmt: skip
    n = sweep.run_numbers(run)
    assert n["split"] == "test" and n["worst_domain"] == "math"
    assert n["worst_ratio"] == pytest.approx(4.0)
    assert n["geomean_ppl"] == pytest.approx((30 * 20 * 40) ** (1 / 3))
    assert n["benchmark_avg"] is None  # no lm-eval tasks in this run
    scored = fake_run(
        tmp_path / "b", {"code": 30.0, "math": 20.0, "prose": 40.0}, TEACHER, bench=0.42
    )
    assert sweep.run_numbers(scored)["benchmark_avg"] == pytest.approx(42.0)  # the final one
    assert sweep.run_numbers(tmp_path / "missing") is None
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    assert sweep.run_numbers(tmp_path / "started") is None  # no final_eval yet: not finished
    nan = fake_run(tmp_path / "nan", {"code": float("nan"), "math": 6.0, "prose": 20.0}, TEACHER)
    assert sweep.run_numbers(nan)["worst_domain"] == "code"  # a diverged domain is the worst
    assert math.isnan(sweep.run_numbers(nan)["geomean_ppl"])


def _numbers(worst, geo):
    return {"worst_ratio": worst, "geomean_ppl": geo, "split": "test", "ratio": {"a": worst}}


def test_summarize_mean_half_range_and_reference():
    results = {
        "equal": {"s0": _numbers(3.0, 80.0), "s1": _numbers(2.0, 82.0), "s2": _numbers(4.0, 78.0)},
        # better on both in s0 and s1; in s2 the worst ratio is better but the mean is not
        "mine": {"s0": _numbers(2.5, 80.0), "s1": _numbers(1.9, 81.0), "s2": _numbers(3.0, 79.0)},
        "worse": {"s0": _numbers(3.5, 70.0), "s1": _numbers(2.5, 70.0), "s2": _numbers(4.5, 70.0)},
    }
    rows = {r["setting"]: r for r in sweep.summarize(results, "equal")}
    eq = rows["equal"]["metrics"]
    assert eq["worst_ratio"]["mean"] == pytest.approx(3.0)
    assert eq["worst_ratio"]["half_range"] == pytest.approx(1.0)
    assert eq["worst_ratio"]["values"] == [3.0, 2.0, 4.0]
    assert eq["geomean_ppl"]["half_range"] == pytest.approx(2.0)
    assert "vs_reference" not in rows["equal"]
    vs = rows["mine"]["vs_reference"]
    assert vs["wins"] == 2 and vs["shared"] == 3
    assert vs["change"]["worst_ratio"] == pytest.approx(statistics.mean([2.5, 1.9, 3.0]) / 3 - 1)
    assert vs["change"]["geomean_ppl"] == pytest.approx(0.0) and vs["both_means"]  # a tie counts
    assert (
        rows["worse"]["vs_reference"]["wins"] == 0
        and not rows["worse"]["vs_reference"]["both_means"]
    )
    text = sweep.table(list(rows.values()), "equal")
    line = next(x for x in text.splitlines() if x.startswith("mine"))
    assert "2.47 ± 0.55" in line and "80.00 ± 1.00" in line and "yes (2/3)" in line
    assert "2.50, 1.90, 3.00" in line and "-17.8%" in line


def _base(tmp_path) -> Path:
    cfg = Config()
    cfg.model.teacher, cfg.model.student = "teacher", "student"
    cfg.data.prepared = str(tmp_path / "data")
    path = tmp_path / "configs" / "distill_ddk.yaml"
    path.parent.mkdir(parents=True)
    cfg.save(path)
    return tmp_path


def test_table_only_reads_a_sweep_folder(tmp_path, capsys):
    demo = _base(tmp_path / "demo-0")  # a `ddk demo` folder is a base
    out = tmp_path / "sweep"
    for setting, ppl in (("equal", 30.0), ("robust", 25.0)):
        fake_run(out / "runs" / setting / "demo-0.seed0", {"code": ppl, "math": ppl, "prose": 60.0}, TEACHER, bench=ppl / 100)  # fmt: skip
        fake_run(out / "runs" / setting / "demo-0.seed1", {"code": ppl, "math": ppl - 1, "prose": 60.0}, TEACHER, bench=ppl / 50)  # fmt: skip
    argv = ["--out", str(out), "--base", str(demo), "--seeds", "0", "1", "--table-only",
            "--settings", "equal", "robust", "--setting", "mine", "distill.alpha=0.3"]  # fmt: skip
    assert sweep.main(argv) == 0
    shown = capsys.readouterr().out
    assert "2 seeds (demo-0.seed0, demo-0.seed1)" in shown and "test split" in shown
    robust = next(x for x in shown.splitlines() if x.startswith("robust"))
    # worst: math, 25/5 and 24/5 against 30/5 and 29/5
    assert "4.90 ± 0.10" in robust and "5.00, 4.80" in robust and "yes (2/2)" in robust
    # the final lm-eval average in percent, shown but not judged (equal scores higher here)
    assert "benchmark avg %" in shown and "Δ bench" not in shown
    assert "37.50 ± 12.50" in robust and "45.00 ± 15.00" in shown
    md = (out / "results.md").read_text()
    assert "| robust" in md and "`robust`: `distill.method=ddk distill.preset=robust`" in md
    assert "`mine`: `distill.alpha=0.3`" in md
    saved = json.loads((out / "results.json").read_text())
    assert (
        set(saved["runs"]["equal"]) == {"demo-0.seed0", "demo-0.seed1"}
        and saved["runs"]["mine"] == {}
    )


def test_plan_configs_and_refusals(tmp_path):
    demo = _base(tmp_path / "d")
    reps = sweep.replicates([str(demo)], [3])
    runs = sweep.plan(
        tmp_path / "out", {"robust": sweep.SETTINGS["robust"]}, reps, ["trainer.max_steps=7"]
    )
    cfg = sweep.requested_config(runs[0])
    assert cfg.trainer.seed == 3 and cfg.trainer.max_steps == 7
    assert cfg.trainer.output_dir == str(tmp_path / "out" / "runs" / "robust" / "d.seed3")
    assert cfg.distill.preset == "robust" and cfg.distill.init_floor  # resolved over a full base
    # a finished folder of the same name but other values is refused, not silently reused
    other = cfg.model_copy(deep=True)
    other.distill.alpha = 0.9
    runs[0].run_dir.mkdir(parents=True)
    other.save(runs[0].run_dir / "config.yaml")
    with pytest.raises(DDKError, match="other values of distill.alpha"):
        sweep.check_same_run(runs[0], cfg)
    cfg.save(runs[0].run_dir / "config.yaml")
    sweep.check_same_run(runs[0], cfg)
    # a run saved before a key existed ran with that key's default: same run, unless the
    # setting asks for another value
    older = cfg.model_dump(mode="json")
    del older["distill"]["gap_trend"]
    (runs[0].run_dir / "config.yaml").write_text(yaml.safe_dump(older))
    sweep.check_same_run(runs[0], cfg)
    cfg.distill.gap_trend = 1.0
    with pytest.raises(DDKError, match="distill.gap_trend"):
        sweep.check_same_run(runs[0], cfg)
    with pytest.raises(DDKError, match="unknown setting 'nope'"):
        sweep.chosen_settings(sweep.parse_args(["--out", "x", "--settings", "nope"]), list)
    with pytest.raises(DDKError, match="neither a config file nor a demo folder"):
        sweep.base_config(tmp_path / "nothing")


def test_tilt_is_a_static_mixture_over_the_data_domains(tmp_path, prepared_dir, capsys):
    from ddk.data.manifest import read_manifest
    from ddk.domains import fixed_mixture

    domains = list(read_manifest(prepared_dir).domains)
    up, *others = domains
    demo = _base(tmp_path / "d")
    out = tmp_path / "sweep"
    fake_run(out / "runs" / "up40" / "d.seed0", dict.fromkeys(domains, 30.0), dict.fromkeys(domains, 10.0))  # fmt: skip
    argv = ["--out", str(out), "--base", str(demo), "--data", str(prepared_dir), "--seeds", "0",
            "--table-only", "--tilt", "up40", f"{up}=0.4"]  # fmt: skip
    assert sweep.main(argv) == 0
    runs = sweep.plan(out, sweep.chosen_settings(sweep.parse_args(argv), lambda: domains),
                      sweep.replicates([str(demo)], [0]), [f"data.prepared={prepared_dir}"])  # fmt: skip
    cfg = sweep.requested_config(runs[0])
    assert cfg.distill.method == "kd"
    # the same shares reach training: the named domain 40 %, the others an equal part of 60 %
    shares = dict(zip(domains, fixed_mixture(domains, cfg.distill.mixture)))
    assert shares[up] == pytest.approx(0.4)
    assert all(shares[d] == pytest.approx(0.6 / len(others)) for d in others)
    assert "`up40`: `distill.method=kd distill.mixture=" in (out / "results.md").read_text()
    for bad, message in (
        (["nope=0.3"], "'nope' is not a domain of the data"),
        ([f"{up}=1.2"], r"in \(0, 1\)"),
        ([f"{up}=x"], "give DOMAIN=SHARE"),
        ([f"{up}=nan"], "give DOMAIN=SHARE"),
        ([f"{up}=0.2", f"{up}=0.3"], "given twice"),
        ([], "name at least one domain"),
        ([f"{d}=0.1" for d in domains], "leave at least one domain out"),
        ([f"{up}=0.6", f"{others[0]}=0.5"], "the shares sum to 1.1"),
    ):
        with pytest.raises(DDKError, match=message):
            sweep.tilt_setting("t", bad, domains)
    # a tilt may not take the name of another setting (equal is the default reference)
    clash = [*argv[:-3], "--settings", "equal", "--tilt", "equal", f"{up}=0.4"]
    with pytest.raises(DDKError, match="'equal' is asked for twice"):
        sweep.chosen_settings(sweep.parse_args(clash), lambda: domains)


def test_tilt_reads_the_domains_from_each_base(tmp_path, prepared_dir):
    from ddk.data.manifest import read_manifest

    domains = list(read_manifest(prepared_dir).domains)
    cfg = Config()
    cfg.data.prepared = str(prepared_dir)
    cfg.save(tmp_path / "a.yaml")
    assert sweep.data_domains([str(tmp_path / "a.yaml")], []) == domains
    # data with other domains under a second base: refused, not mixed up
    other = tmp_path / "other"
    shutil.copytree(prepared_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["domains"].pop(domains[0])
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg.data.prepared = str(other)
    cfg.save(tmp_path / "b.yaml")
    with pytest.raises(DDKError, match="one set of domains"):
        sweep.data_domains([str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")], [])
    with pytest.raises(DDKError, match="--tilt needs the data"):
        sweep.data_domains([str(tmp_path / "a.yaml")], ["data.prepared="])


@pytest.mark.slow
def test_tiny_sweep_end_to_end_and_resumable(
    tmp_path, teacher_dir, student_dir, prepared_dir, capsys
):
    from tests.test_trainer import make_config

    base = tmp_path / "base.yaml"
    make_config(tmp_path / "unused", teacher_dir, student_dir, prepared_dir,
                **{"trainer.max_steps": 2, "distill.K": 1, "trainer.save_every": 1}).save(base)  # fmt: skip
    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--base", str(base), "--inprocess", "--settings", "equal", "robust"]
    assert sweep.main(argv) == 0
    first = capsys.readouterr().out
    assert "0 of 2 runs finished already; 2 to go" in first
    assert "yes (1/1)" in first or "no (0/1)" in first  # judged against equal
    numbers = sweep.run_numbers(out / "runs" / "robust" / "base")
    numbers_equal = sweep.run_numbers(out / "runs" / "equal" / "base")
    assert numbers["split"] == "test" and numbers["worst_ratio"] > 0
    assert (
        Config.model_validate(
            __import__("yaml").safe_load(
                (out / "runs" / "robust" / "base" / "config.yaml").read_text()
            )
        ).distill.preset
        == "robust"
    )
    assert sweep.main(argv) == 0  # rerun: nothing to do, same table
    again = capsys.readouterr().out
    assert "2 of 2 runs finished already; 0 to go" in again
    assert first.splitlines()[-4:] == again.splitlines()[-4:]
    # a run cut short (no final_eval yet) is resumed, not restarted or skipped
    metrics = out / "runs" / "equal" / "base" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("".join(x + "\n" for x in lines if '"final_eval"' not in x))
    assert sweep.main(argv) == 0
    resumed = capsys.readouterr().out
    assert "1 of 2 runs finished already; 1 to go" in resumed
    assert "resuming from" in resumed  # from its last checkpoint
    assert sweep.run_numbers(metrics.parent) == numbers_equal
    # the same folder asked for with other values is refused, not tabulated as if it matched
    with pytest.raises(DDKError, match="other values of distill.alpha"):
        sweep.main([*argv[:-3], "--setting", "equal", "distill.method=equal", "distill.alpha=0.1"])


@pytest.mark.slow
def test_benchmarks_score_each_finished_final_student_once(tmp_path, capsys):
    """--benchmarks builds one task per domain from the data's test documents, scores every
    finished run's final student with lm-eval (as `ddk eval --tasks` does), leaves a score made
    in training alone, and finds the corpus from the data's manifest (--corpus once it moved)."""
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from ddk.config import EvalSection, PrepareSection
    from ddk.data.prepare import prepare
    from ddk.demo.build import tiny_causal_lm, train_bpe_tokenizer
    from ddk.demo.corpus import build_demo_corpus
    from ddk.harness import benchmark_model_cli

    corpus = tmp_path / "corpus"
    build_demo_corpus(corpus, scale=0.05, seed=0)
    texts = [json.loads(x)["text"] for f in sorted(corpus.glob("*/*.jsonl")) for x in open(f)]
    tok = train_bpe_tokenizer(texts, 512, tmp_path / "tokenizer")
    prepared = tmp_path / "prepared"
    prepare(PrepareSection(input=str(corpus), output=str(prepared), seq_len=64, val_sequences=6),
            str(tok), progress=False)  # fmt: skip
    model = tmp_path / "model"
    tiny_causal_lm(len(AutoTokenizer.from_pretrained(tok))).save_pretrained(model)
    AutoTokenizer.from_pretrained(tok).save_pretrained(model)
    cfg = Config()
    cfg.model.teacher, cfg.model.student, cfg.data.prepared = str(model), str(model), str(prepared)
    base = tmp_path / "base.yaml"
    cfg.save(base)
    out = tmp_path / "sweep"
    for setting, bench in (("equal", None), ("robust", 0.9)):
        run = fake_run(out / "runs" / setting / "base", {"code": 30.0, "math": 20.0}, TEACHER, bench=bench)  # fmt: skip
        (run / "final").symlink_to(model, target_is_directory=True)
    argv = ["--out", str(out), "--base", str(base), "--table-only", "--benchmarks",
            "--settings", "equal", "robust"]  # fmt: skip
    assert sweep.main(argv) == 0
    shown = capsys.readouterr().out
    assert "benchmarks: equal on base" in shown and "benchmarks: robust" not in shown
    saved = json.loads((out / "runs" / "equal" / "base" / sweep.SWEEP_BENCHMARKS).read_text())
    assert not (out / "runs" / "robust" / "base" / sweep.SWEEP_BENCHMARKS).exists()
    tasks = json.loads(next((out / "tasks").glob("*/tasks.json")).read_text())
    assert sorted(tasks) == sorted(json.loads((prepared / "manifest.json").read_text())["domains"])
    # the same number `ddk eval --tasks` gives for that model on those tasks
    folder = Path(saved["task_folder"])
    direct = benchmark_model_cli(
        str(model), EvalSection(tasks=tasks, include_path=[str(folder)]), out=None, as_json=True
    )
    capsys.readouterr()
    assert saved["average"] == pytest.approx(direct["average"])
    row = {x.split()[0]: x for x in shown.splitlines() if x.startswith(("equal", "robust"))}
    assert f"{100 * saved['average']:.2f} ± 0.00" in row["equal"] and "90.00" in row["robust"]
    # a final score that failed in training (no average) is scored again by the sweep
    failed = out / "runs" / "robust" / "base" / "metrics.jsonl"
    failed.write_text(failed.read_text().replace('"average": 0.9', '"average": null'))
    assert sweep.run_numbers(failed.parent)["benchmark_avg"] is None
    assert sweep.main(argv) == 0
    assert "benchmarks: robust on base" in capsys.readouterr().out
    assert sweep.run_numbers(failed.parent)["benchmark_avg"] == pytest.approx(
        100 * saved["average"]
    )
    mtime = (out / "runs" / "equal" / "base" / sweep.SWEEP_BENCHMARKS).stat().st_mtime_ns
    assert sweep.main(argv) == 0  # scored already: nothing scored again
    assert "benchmarks:" not in capsys.readouterr().out
    assert (out / "runs" / "equal" / "base" / sweep.SWEEP_BENCHMARKS).stat().st_mtime_ns == mtime
    # the corpus moved: a one-line refusal naming --corpus, then --corpus finds it
    shutil.rmtree(out / "tasks")
    (out / "runs" / "equal" / "base" / sweep.SWEEP_BENCHMARKS).unlink()
    corpus.rename(tmp_path / "moved")
    with pytest.raises(DDKError, match="give it with --corpus"):
        sweep.main(argv)
    assert sweep.main([*argv, "--corpus", str(tmp_path / "moved")]) == 0
    again = json.loads((out / "runs" / "equal" / "base" / sweep.SWEEP_BENCHMARKS).read_text())
    assert again["average"] == saved["average"]
