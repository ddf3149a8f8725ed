"""`ddk demo --quick` end to end at tiny sizes, and the README's first command as written."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddk.cli import main
from ddk.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
TINY = ["--scale", "0.06", "--steps", "24", "--teacher-steps", "100", "--student-steps", "10"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _final_and_start(run: Path):
    records = read_metrics(run / "metrics.jsonl")
    start = next(r for r in records if r.get("event") == "domain_update")
    final = next(r for r in records if r.get("event") == "final_eval")
    return start["domains"], final["domains"]


def _geo(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


@pytest.mark.slow  # the whole demo: about a minute
def test_demo_quick(tmp_path, capsys):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    assert main(["demo", "--quick", "--out", str(out), "--cache-dir", str(cache), *TINY]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("domain  ") :]
    for word in (
        "code",
        "prose",
        "math",
        "records",
        "teacher",
        "student before",
        "cpt",
        "kd",
        "ddk",
        "equal",
        "geometric mean",
        "worst ratio",
    ):
        assert word in table, word
    # paper DDK, both presets, equal and KD side by side
    assert "ddk+robust" in table and "ddk+focus" in table
    robust = yaml.safe_load((out / "runs" / "ddk+robust" / "config.yaml").read_text())
    assert robust["distill"]["preset"] == "robust" and robust["distill"]["gap"] == "log_ratio"
    focus = yaml.safe_load((out / "runs" / "ddk+focus" / "config.yaml").read_text())
    assert focus["distill"]["preset"] == "focus" and focus["distill"]["focus"] == "worst"
    for method in ("cpt", "kd", "ddk", "ddk+robust", "ddk+focus", "equal"):
        start, final = _final_and_start(out / "runs" / method)
        for domain, d in start.items():
            assert d["teacher_ppl"] < d["student_ppl"], f"teacher not better on {domain}"
        assert _geo(v["student_ppl"] for v in final.values()) < _geo(
            v["student_ppl"] for v in start.values()
        ), f"{method} did not lower the student's mean perplexity"
    report = out / "report"
    for name in (
        "report.html",
        "summary.md",
        "perplexity_by_domain.png",
        "ratio_over_training.png",
        "domain_weights.png",
        "loss_curves.png",
    ):
        assert (report / name).is_file(), name
    for png in report.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        pil = pytest.importorskip("PIL.Image")
        with pil.open(png) as img:
            assert img.size[0] > 100 and img.size[1] > 100
    for stage in ("prepare", "pretrain_teacher", "pretrain_student", "distill_ddk"):
        assert (out / "configs" / f"{stage}.yaml").is_file()
    _assert_benchmark_scores(out)
    # the second run reuses the cached teacher and student
    assert (
        main(
            [
                "demo",
                "--quick",
                "--out",
                str(out),
                "--cache-dir",
                str(cache),
                *TINY,
                "--methods",
                "ddk",
            ]
        )
        == 0
    )
    second = capsys.readouterr().out
    assert "using cached teacher and student" in second
    # It replaced only what the first demo wrote, and said so.
    assert "replacing the previous demo" in second
    assert (out / ".ddk-demo.json").is_file()


def _assert_benchmark_scores(out: Path) -> None:
    """Every method, the teacher and the student before: a score per domain's task, in
    results.md and in the report (lm-eval is in the test extra)."""
    pytest.importorskip("lm_eval")
    results = (out / "results.md").read_text()
    summary = (out / "report" / "summary.md").read_text()
    assert "Benchmark accuracy in percent" in results
    assert "## Benchmark scores (lm-eval)" in summary
    for domain in ("code", "prose", "math", "records"):
        assert f"demo_{domain}_continuation ({domain})" in results
    for label in ("teacher", "student before", "cpt", "kd", "ddk", "equal"):
        (row,) = [x for x in results.splitlines() if x.startswith(f"{label}  ")][-1:]
        assert len(re.findall(r"\d+\.\d\d", row)) >= 5, row  # four tasks and the average
        assert re.search(rf"^\| {re.escape(label)} +\|", summary, flags=re.M), label
    for method in ("cpt", "kd", "ddk", "equal"):
        events = [
            r
            for r in read_metrics(out / "runs" / method / "metrics.jsonl")
            if r.get("event") == "benchmark_eval"
        ]
        assert [e["final"] for e in events] == [True] and "failed" not in events[0]
        assert (out / "runs" / method / "benchmarks.json").is_file()


def test_demo_without_lm_eval_says_so_and_skips_benchmarks(tmp_path, capsys, monkeypatch):
    import importlib.util

    from ddk.demo import run

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a)
    )
    assert run.demo_benchmarks(tmp_path, tmp_path, tmp_path, 0, 0.0) == []
    assert run.score_references({"teacher": tmp_path}, [], tmp_path, 0.0) == []
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("lm-eval is not installed") and "[eval]" in line
    assert not (tmp_path / "tasks").exists()


def _readme_first_command() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return blocks[0].strip()


@pytest.mark.slow  # a fresh venv and the demo: minutes
def test_readme_first_command_as_written(tmp_path):
    command = _readme_first_command()
    assert command.endswith("ddk demo --quick"), command
    # Run it in a copy of the repository, with the demo at tiny sizes. The venv is made by
    # the base interpreter and sees only its packages (--system-site-packages), not this
    # test's venv, so pip installs the rest as a new user gets it (torch included, several
    # GB): it is removed afterwards, or three kept pytest temp dirs fill a small disk.
    free_gb = shutil.disk_usage(tmp_path).free / 2**30
    assert free_gb > 10, (
        f"the README install needs 10 GB free in {tmp_path}; {free_gb:.1f} GB is free"
    )
    work = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(work)], check=True)
    for path in ("README.md", "pyproject.toml"):  # uncommitted edits count too
        (work / path).write_text((REPO / path).read_text())
    subprocess.run(["rm", "-rf", str(work / "ddk")], check=True)
    subprocess.run(["cp", "-r", str(REPO / "ddk"), str(work / "ddk")], check=True)
    runnable = command.replace(
        "python3 -m venv .venv", "python3 -m venv --system-site-packages .venv"
    )
    runnable += " " + " ".join(TINY) + f" --cache-dir {tmp_path / 'cache'} --methods kd ddk"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(
        [str(Path(sys.base_prefix) / "bin"), *env.get("PATH", "").split(os.pathsep)]
    )
    try:
        done = subprocess.run(
            ["bash", "-c", runnable], cwd=work, env=env, capture_output=True, text=True, timeout=900
        )
    finally:
        shutil.rmtree(work / ".venv", ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (work / "ddk-demo" / "report" / "report.html").is_file()
    assert "worst ratio" in done.stdout


@pytest.mark.slow  # the whole chat demo at tiny sizes
def test_demo_chat_quick_reports_masked_perplexities(tmp_path, capsys):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    argv = ["demo", "--chat", "--quick", "--out", str(out), "--cache-dir", str(cache), *TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "count only the targets of the chat loss mask" in printed
    table = printed[printed.index("domain  ") :]
    for word in ("code", "math", "records", "kd", "ddk", "equal", "worst ratio"):
        assert word in table, word
    manifest = json.loads((out / "prepared" / "manifest.json").read_text())
    assert manifest["chat"]["spans_from"] == "generation"
    for method in ("kd", "ddk", "equal"):
        records = read_metrics(out / "runs" / method / "metrics.jsonl")
        final = next(r for r in records if r.get("event") == "final_eval")
        assert final["split"] == "test" and final["targets"].startswith("chat loss mask")
