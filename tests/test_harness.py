"""Benchmarks through lm-evaluation-harness (ddk.harness, `ddk eval --tasks`, eval.* checks).

Every task here is an lm-eval YAML over a local JSONL file (eval.include_path), run on a tiny
model built in the test: nothing is downloaded."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from ddk.cli import main  # noqa: E402
from ddk.config import EvalSection  # noqa: E402
from ddk.demo.build import tiny_causal_lm  # noqa: E402
from ddk.harness import BenchmarkPlan, plan_problems, score  # noqa: E402

WORDS = ["the", "model", "learns", "data", "from", "text", "and", "code", "with", "small"]


def write_task(folder: Path, name: str, items: list[dict], **spec) -> Path:
    """An lm-eval task YAML over a JSONL file, as a user writes one."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    config = {
        "task": name,
        "dataset_path": "json",
        # datasets' own cache in the test's folder, not the user's ~/.cache
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "cache")},
        "test_split": "test",
        **spec,
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def choice_task(folder: Path, name: str, items: list[dict], **spec) -> Path:
    """A multiple-choice task over items {"context", "choices", "label"}."""
    return write_task(
        folder,
        name,
        items,
        output_type="multiple_choice",
        doc_to_text="{{context}}",
        doc_to_choice="{{choices}}",
        doc_to_target="{{label}}",
        **spec,
    )


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_causal_lm(len(tok), hidden_size=32, num_heads=2, max_positions=64, seed=3).eval()


def choice_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context): the continuation's tokens of the jointly tokenised text."""
    context_ids = tok(context).input_ids
    whole = tok(context + continuation).input_ids
    assert whole[: len(context_ids)] == context_ids
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(whole[1:])
    per_token = logprobs[torch.arange(len(targets)), targets]
    return float(per_token[len(context_ids) - 1 :].sum())


def test_multiple_choice_accuracy_equals_direct_loglikelihoods(tmp_path, model, tok):
    rng = random.Random(0)
    items = []
    for _ in range(40):
        choices = [words(rng, rng.randint(1, 4)) for _ in range(4)]
        items.append({"context": words(rng, 6), "choices": choices, "label": rng.randrange(4)})
    folder = choice_task(
        tmp_path / "tasks",
        "local_choice",
        items,
        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}],
        metadata={"version": 2.0},
    )
    plan = BenchmarkPlan(tasks={"local_choice": "prose"}, include_path=(str(folder),))
    record = score(model, tok, plan)

    correct = correct_norm = 0
    for item in items:
        # lm-eval's target_delimiter " " joins context and choice.
        lls = [choice_loglikelihood(model, tok, item["context"], " " + c) for c in item["choices"]]
        correct += max(range(4), key=lls.__getitem__) == item["label"]
        per_char = [ll / len(c) for ll, c in zip(lls, item["choices"])]
        correct_norm += max(range(4), key=per_char.__getitem__) == item["label"]
    entry = record["tasks"]["local_choice"]
    assert 0 < correct < len(items)  # the comparison can tell right from wrong
    assert entry["score"] == correct / len(items)
    assert entry["metric"] == "acc,none"
    assert entry["metrics"]["acc_norm,none"]["value"] == correct_norm / len(items)
    assert entry["samples"] == len(items) and entry["n_shot"] == 0 and entry["version"] == 2.0
    assert entry["stderr"] > 0 and record["lm_eval_version"]
    assert record["domains"] == {"prose": {"tasks": ["local_choice"], "score": entry["score"]}}
    assert model.training is False  # scoring put back the mode it found


def test_generate_until_task_end_to_end(tmp_path, model, tok):
    """Exact match through lm-eval's generation equals the model's own greedy continuation:
    half the targets are what it generates, half are not."""
    rng = random.Random(1)
    items = []
    for i in range(10):
        context = words(rng, 5)
        ids = tok(context, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        greedy = tok.decode(out[0, ids.shape[1] :]).split("\n")[0].split(tok.eos_token)[0]
        items.append({"context": context, "answer": greedy.strip() if i % 2 == 0 else "nope"})
    assert any(i["answer"] for i in items[::2])
    folder = write_task(
        tmp_path / "tasks",
        "local_generate",
        items,
        output_type="generate_until",
        doc_to_text="{{context}}",
        doc_to_target="{{answer}}",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
        filter_list=[
            {
                "name": "strip",
                "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}],
            }
        ],
        metric_list=[{"metric": "exact_match"}],
    )
    plan = BenchmarkPlan(
        tasks={"local_generate": None}, include_path=(str(folder),), batch_size=1, limit=8
    )
    entry = score(model, tok, plan)["tasks"]["local_generate"]
    assert entry["metric"] == "exact_match,strip"
    assert entry["score"] == 0.5 and entry["samples"] == 8 and entry["limit"] == 8


def test_scoring_leaves_the_callers_random_state_alone(tmp_path, model, tok):
    items = [{"context": "the model", "choices": ["learns", "data"], "label": 0}] * 3
    folder = choice_task(tmp_path / "tasks", "tiny_choice", items)
    plan = BenchmarkPlan(tasks={"tiny_choice": None}, include_path=(str(folder),))
    torch.manual_seed(123)
    random.seed(123)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(123)
    score(model, tok, plan)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


# ------------------------------------------------------------------ bad input


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_unknown_task_names_close_matches(student_dir, capsys):
    assert main(["eval", "--model", str(student_dir), "--tasks", "gsm8"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "unknown task 'gsm8'" in line and "gsm8k" in line


def test_lm_eval_missing_names_the_extra(student_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    assert main(["eval", "--model", str(student_dir), "--tasks", "gsm8k"]) == 2
    assert "pip install 'ddk-distill[eval]'" in error_line(capsys.readouterr().err)


def test_dataset_not_available_offline_names_it_and_the_setting(tmp_path, student_dir):
    folder = write_task(
        tmp_path / "tasks",
        "hub_task",
        [],
        output_type="multiple_choice",
        doc_to_text="{{q}}",
        doc_to_choice="{{c}}",
        doc_to_target="{{a}}",
    )
    spec = yaml.safe_load((folder / "hub_task.yaml").read_text())
    spec.update(dataset_path="ddk-tests/not-on-this-machine", dataset_name="main")
    del spec["dataset_kwargs"]
    (folder / "hub_task.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    argv = ["eval", "--model", str(student_dir), "--tasks", "hub_task", "--include-path"]
    done = subprocess.run(
        [sys.executable, "-m", "ddk.cli", *argv, str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    line = error_line(done.stderr)
    assert "'ddk-tests/not-on-this-machine' (config 'main')" in line
    assert "HF_HUB_OFFLINE=1 is set" in line


def test_task_mapped_to_a_missing_domain_stops_distill_before_training(
    tmp_path, teacher_dir, student_dir, prepared_dir, capsys
):
    folder = write_task(
        tmp_path / "tasks",
        "local_gen",
        [{"context": "the", "answer": "model"}],
        output_type="generate_until",
        doc_to_text="{{context}}",
        doc_to_target="{{answer}}",
    )
    run = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"teacher": str(teacher_dir), "student": str(student_dir)},
                "data": {"prepared": str(prepared_dir)},
                "trainer": {"output_dir": str(run), "max_steps": 2},
                "eval": {"tasks": {"chinese": ["local_gen"]}, "include_path": [str(folder)]},
            }
        )
    )
    assert main(["distill", str(cfg)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "eval.tasks: domain 'chinese' is not a domain of the data (code, math, prose)" in line
    assert not (run / "metrics.jsonl").exists()


def test_plan_problems_lists_each_bad_input_once(tmp_path):
    section = EvalSection(
        tasks={"math": ["no_such_task_xyz"]},
        num_fewshot={"other": 2},
        include_path=[str(tmp_path / "missing")],
    )
    problems = plan_problems(BenchmarkPlan.from_section(section), ["math", "code"])
    assert problems == [
        "eval.num_fewshot: 'other' is not one of eval.tasks",
        f"eval.include_path: '{tmp_path / 'missing'}' is not a folder",
    ]


def test_benchmarks_json_never_replaces_a_users_file(tmp_path, model, tok):
    from ddk.errors import DDKError
    from ddk.harness import benchmarks_payload, write_benchmarks

    mine = tmp_path / "scores.json"
    mine.write_text('{"my": "notes"}')
    with pytest.raises(DDKError, match="not a ddk benchmarks file"):
        write_benchmarks(mine, benchmarks_payload("m", {"tasks": {}}))
    assert mine.read_text() == '{"my": "notes"}'
    ours = tmp_path / "ours.json"
    write_benchmarks(ours, benchmarks_payload("m", {"tasks": {}}))
    write_benchmarks(ours, benchmarks_payload("m2", {"tasks": {}}))  # its own file: replaced
    assert json.loads(ours.read_text())["model"] == "m2"


def test_ddk_eval_scores_a_run_folder_with_its_eval_section(
    tmp_path, student_dir, tok, capsys, monkeypatch
):
    """`ddk eval --model RUN` scores RUN/final with the tasks RUN/config.yaml names."""
    import shutil

    rng = random.Random(2)
    items = [
        {"context": words(rng, 4), "choices": [words(rng, 2) for _ in range(3)], "label": 1}
        for _ in range(6)
    ]
    folder = choice_task(tmp_path / "tasks", "run_choice", items)
    run = tmp_path / "run"
    shutil.copytree(student_dir, run / "final")
    (run / "metrics.jsonl").write_text("")
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {"eval": {"tasks": {"prose": ["run_choice"]}, "include_path": [str(folder)]}}
        )
    )
    out = tmp_path / "scores.json"
    assert main(["eval", "--model", str(run), "--out", str(out), "--limit", "4"]) == 0
    payload = json.loads(out.read_text())
    assert payload["format"] == "ddk.benchmarks" and payload["model"] == str(run / "final")
    assert payload["tasks"]["run_choice"]["domain"] == "prose"
    assert payload["tasks"]["run_choice"]["samples"] == 4
    assert "run_choice" in capsys.readouterr().out


def test_a_benchmark_that_fails_mid_training_is_a_warning_and_a_record(
    tmp_path, model, tok, capsys
):
    from ddk.harness import score_or_failure

    items = [{"context": "the model", "choices": ["learns", "data"], "label": 0}] * 3
    folder = choice_task(tmp_path / "tasks", "vanishing", items)
    plan = BenchmarkPlan(tasks={"vanishing": "prose"}, include_path=(str(folder),))
    assert plan_problems(plan, ["prose"]) == []  # fine before training
    (folder / "vanishing.jsonl").unlink()  # ... and gone by the time it is scored
    record = score_or_failure(model, tok, plan)
    assert record["failed"].startswith("FileNotFoundError") and "tasks" not in record
    (warning,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("warning: ")]
    assert "benchmark evaluation failed" in warning and "training continues" in warning
    assert model.training is False


def test_run_benchmarks_write_events_and_benchmarks_json(tmp_path, model, tok):
    from ddk.harness import RunBenchmarks
    from ddk.trackers import tracker_values

    rng = random.Random(4)
    items = [
        {"context": words(rng, 4), "choices": [words(rng, 2) for _ in range(3)], "label": 2}
        for _ in range(5)
    ]
    folder = choice_task(tmp_path / "tasks", "run_task", items)
    section = EvalSection(
        tasks={"prose": ["run_task"]}, include_path=[str(folder)], every_intervals=2
    )
    run = tmp_path / "run"
    run.mkdir()
    benchmarks = RunBenchmarks(section, run, tok)
    assert [benchmarks.due(i) for i in range(5)] == [False, False, True, False, True]
    first = benchmarks.score(model, 10)
    last = benchmarks.score(model, 20, final=True)
    assert first["event"] == "benchmark_eval" and (first["step"], first["final"]) == (10, False)
    assert last["tasks"]["run_task"]["score"] == first["tasks"]["run_task"]["score"]
    saved = json.loads((run / "benchmarks.json").read_text())
    assert saved["model"] == str(run / "final") and saved["step"] == 20
    assert [h["step"] for h in saved["history"]] == [10, 20]
    assert saved["history"][1]["domains"] == {"prose": last["average"]}
    assert tracker_values(last)["benchmark/run_task"] == last["tasks"]["run_task"]["score"]
    benchmarks.score(model, 15)  # a resumed run redoes what came after its checkpoint
    saved = json.loads((run / "benchmarks.json").read_text())
    assert [h["step"] for h in saved["history"]] == [10, 15] and saved["model"] == "step 15"
