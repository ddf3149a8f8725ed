"""`ddk report`: plots, summary.md and a self-contained report.html from run folders."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from ddk.cli import main
from ddk.errors import DDKError
from ddk.report import summarize_runs, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = [
    "perplexity_by_domain.png",
    "ratio_over_training.png",
    "domain_weights.png",
    "loss_curves.png",
]
DOMAINS = ["web", "code", "math"]
TEACHER = {"web": 20.0, "code": 8.0, "math": 12.0}
BEFORE = {"web": 60.0, "code": 40.0, "math": 90.0}
# after training; in the ddk run "web" has the largest perplexity but "math" the largest ratio
AFTER = {
    "kd": {"web": 30.0, "code": 20.0, "math": 50.0},  # ratios 1.5, 2.5, 4.17
    "ddk": {"web": 32.0, "code": 18.0, "math": 30.0},  # ratios 1.6, 2.25, 2.5
}


def write_run(
    path: Path,
    method: str,
    after: dict[str, float],
    teacher: dict[str, float] | None = TEACHER,
    before: dict[str, float] = BEFORE,
    steps: int = 100,
    K: int = 20,
    final: bool = True,
) -> Path:
    """A run folder as `ddk distill` leaves it: config.yaml + metrics.jsonl."""
    path.mkdir(parents=True)
    cfg = {
        "model": {"teacher": "t" if teacher else None, "student": "s"},
        "distill": {"method": method, "K": K, "alpha": 0.5, "gamma": 0.2},
        "trainer": {"output_dir": str(path), "max_steps": steps, "log_every": 10},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    domains = list(after)
    weights = [1 / len(domains)] * len(domains)
    records = []

    def event(name: str, step: int) -> dict:
        f = step / steps  # perplexities move geometrically from before to after
        out = {}
        for i, d in enumerate(domains):
            s = before[d] ** (1 - f) * after[d] ** f
            t = teacher[d] if teacher else None
            out[d] = {
                "student_ppl": s,
                "teacher_ppl": t,
                "ratio": s / t if t else None,
                "weight": weights[i],
            }
        return {
            "event": name,
            "step": step,
            "interval": min(step // K, (steps - 1) // K),
            "domains": out,
        }

    for step in range(0, steps, 10):
        if step % K == 0:
            if method == "ddk" and teacher and step > 0:
                ratios = [before[d] / teacher[d] for d in domains]
                weights = [r / sum(ratios) for r in ratios]
            records.append(event("domain_update", step))
        n = step + 10
        ce = 4.0 * math.exp(-n / 60) + 2.0
        records.append(
            {
                "step": n,
                "tokens": n * 8 * 64,
                "lr": 3e-4,
                "loss": ce + 0.2 * ce / 4,
                "ce": ce,
                "kl": ce / 4 if method != "cpt" else 0.0,
                "grad_norm": 1.0,
                "skipped": 0,
                "tokens_per_s": 1234.5,
                "bad_steps": 0,
            }
        )
    if final:
        records.append(event("final_eval", steps))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def table_row(markdown: str, first_cell: str, header: str | None = None) -> dict[str, str]:
    """The row of a Markdown table whose first cell is `first_cell`, as {header: cell}; with
    `header`, only tables that have that column."""
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|-"):
            headers = [c.strip() for c in line.strip("|").split("|")]
            if header and header not in headers:
                continue
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip("|").split("|")]
                if cells[0] == first_cell:
                    return dict(zip(headers, cells))
    raise AssertionError(f"no table row '{first_cell}' in:\n{markdown}")


def png_ok(data: bytes) -> None:
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5000  # a real plot, not an empty canvas


@pytest.fixture
def two_runs(tmp_path):
    kd = write_run(tmp_path / "run_kd", "kd", AFTER["kd"])
    ddk = write_run(tmp_path / "run_ddk", "ddk", AFTER["ddk"])
    return kd, ddk


def test_report_files_and_contents(two_runs, tmp_path):
    out = tmp_path / "out"
    page = write_report([str(p) for p in two_runs], out)
    assert page == out / "report.html"
    for name in [*PLOTS, "summary.md", "report.html"]:
        assert (out / name).is_file(), name
    for name in PLOTS:
        png_ok((out / name).read_bytes())

    text = page.read_text()
    assert "<title>" in text and "kd" in text and "ddk" in text
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 4
    for data in images:
        png_ok(base64.b64decode(data))
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert "<table>" in text

    # worst domain = largest ratio, computed by hand; for ddk that is not the largest ppl
    summary_md = (out / "summary.md").read_text()
    for label, after in AFTER.items():
        ratios = {d: after[d] / TEACHER[d] for d in DOMAINS}
        worst = max(ratios, key=ratios.get)
        assert worst == "math"
        row = table_row(summary_md, label, header="worst domain")
        assert row["worst domain"] == worst
        assert row["worst ratio"] == f"{ratios[worst]:.3f}"
        assert row["geo-mean ppl"] == f"{geomean(after.values()):.2f}"
        assert table_row(summary_md, worst)[f"{label} ratio"] == f"{ratios[worst]:.3f}"
    assert max(AFTER["ddk"], key=AFTER["ddk"].get) == "web"
    assert "Lowest worst-domain ratio: **ddk** (2.500 on math)" in summary_md
    assert f"teacher geo-mean ppl {geomean(TEACHER.values()):.2f}" in summary_md
    assert "worst-domain ratio 7.500 (math)" in summary_md  # the student before training
    assert "| domain" in summary_md and "|---" in summary_md


def test_pngs_open_with_pil(two_runs, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    write_report(two_runs, tmp_path / "out")
    for name in PLOTS:
        with Image.open(tmp_path / "out" / name) as im:
            im.verify()
        with Image.open(tmp_path / "out" / name) as im:
            w, h = im.size
            assert w >= 400 and h >= 300


def test_summarize_runs_numbers(two_runs):
    s = summarize_runs(two_runs)
    assert s["domains"] == DOMAINS
    assert s["teacher"] == TEACHER
    assert s["before"] == pytest.approx(BEFORE)
    assert [r["label"] for r in s["runs"]] == ["kd", "ddk"]
    kd, ddk = s["runs"]
    assert kd["ppl"] == pytest.approx(AFTER["kd"])
    assert ddk["ratio"] == pytest.approx({d: AFTER["ddk"][d] / TEACHER[d] for d in DOMAINS})
    assert (kd["worst_domain"], ddk["worst_domain"]) == ("math", "math")
    assert kd["worst_ratio"] == pytest.approx(50 / 12)
    assert ddk["worst_ratio"] == pytest.approx(2.5)
    assert ddk["geomean_ppl"] == pytest.approx(geomean(AFTER["ddk"].values()))
    assert s["best_run"] == "ddk"
    assert s["same_domains"] and not s["teacher_mismatch"]
    assert kd["steps"] == 100 and kd["tokens"] == 100 * 8 * 64
    assert kd["has_final_eval"] and kd["K"] == 20


def test_default_out_dir_and_labels_for_shared_method(tmp_path):
    a = write_run(tmp_path / "run_a", "ddk", AFTER["ddk"])
    b = write_run(tmp_path / "run_b", "ddk", AFTER["kd"])
    page = write_report([a, b])
    assert page == a / "report" / "report.html"
    text = page.read_text()
    assert "ddk (run_a)" in text and "ddk (run_b)" in text
    labels = [r["label"] for r in summarize_runs([a, b])["runs"]]
    assert labels == ["ddk (run_a)", "ddk (run_b)"]


def test_missing_run_dir_is_a_one_line_error(tmp_path):
    good = write_run(tmp_path / "good", "kd", AFTER["kd"])
    with pytest.raises(DDKError) as err:
        write_report([good, tmp_path / "nope"])
    assert "nope" in str(err.value) and "\n" not in str(err.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DDKError, match="metrics.jsonl") as err:
        write_report([tmp_path / "empty"])
    assert "\n" not in str(err.value)

    no_evals = tmp_path / "no_evals"
    no_evals.mkdir()
    (no_evals / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 3.0}) + "\n")
    with pytest.raises(DDKError, match="no evaluation records") as err:
        write_report([no_evals])
    assert "\n" not in str(err.value)


def test_cli_report(two_runs, tmp_path, capsys):
    out = tmp_path / "cli_out"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    assert (out / "report.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing" in err and "\n" not in err


def test_run_without_teacher(tmp_path):
    cpt = write_run(tmp_path / "cpt_run", "cpt", AFTER["kd"], teacher=None)
    ddk = write_run(tmp_path / "ddk_run", "ddk", AFTER["ddk"])
    page = write_report([cpt, ddk], tmp_path / "out")
    summary_md = (tmp_path / "out" / "summary.md").read_text()
    cpt_row = table_row(summary_md, "cpt", header="worst domain")
    assert cpt_row["worst domain"] == "n/a" and cpt_row["worst ratio"] == "n/a"
    assert table_row(summary_md, "web")["cpt ratio"] == "n/a"
    assert table_row(summary_md, "web")["ddk ratio"] == "1.600"
    assert "Lowest worst-domain ratio: **ddk**" in summary_md
    # the teacher column still comes from the run that has one
    s = summarize_runs([cpt, ddk])
    assert s["teacher"] == TEACHER and s["runs"][0]["worst_domain"] is None
    assert s["runs"][0]["geomean_ppl"] == pytest.approx(geomean(AFTER["kd"].values()))
    assert page.is_file()

    # only teacher-less runs: no ratios at all, still a report
    page = write_report([cpt], tmp_path / "out2")
    assert (
        "no run has teacher perplexities" in (tmp_path / "out2" / "summary.md").read_text().lower()
    )
    for name in PLOTS:
        png_ok((tmp_path / "out2" / name).read_bytes())


def test_single_eval_and_different_domains(tmp_path):
    # stopped after the first evaluation: one domain_update record, no final_eval
    short = write_run(tmp_path / "short", "kd", AFTER["kd"], steps=10, K=20, final=False)
    # a run evaluated on another set of domains
    other_after = {"web": 25.0, "code": 15.0, "law": 40.0}
    other = write_run(
        tmp_path / "other",
        "ddk",
        other_after,
        teacher={"web": 20.0, "code": 8.0, "law": 10.0},
        before={"web": 60.0, "code": 40.0, "law": 80.0},
    )
    write_report([short, other], tmp_path / "out")
    s = summarize_runs([short, other])
    assert s["domains"] == ["web", "code", "math", "law"]
    assert not s["same_domains"]
    short_run, other_run = s["runs"]
    assert not short_run["has_final_eval"] and short_run["final_step"] == 0
    assert short_run["ppl"] == pytest.approx(BEFORE)  # its only evaluation is at step 0
    assert other_run["worst_domain"] == "law" and other_run["worst_ratio"] == pytest.approx(4.0)
    md = (tmp_path / "out" / "summary.md").read_text()
    law = table_row(md, "law")
    # the first run (whose step 0 is "before") has no law domain: blanks, not zeros
    assert law["teacher ppl"] == "10.00" and law["student before"] == ""
    assert law["kd ppl"] == "" and law["kd ratio"] == ""
    assert law["ddk ppl"] == "40.00" and law["ddk ratio"] == "4.000"
    assert table_row(md, "math")["ddk ppl"] == ""
    assert "no final evaluation" in md
    for name in PLOTS:
        png_ok((tmp_path / "out" / name).read_bytes())


def test_html_is_self_contained_when_moved(two_runs, tmp_path):
    page = write_report(two_runs, tmp_path / "out")
    moved = tmp_path / "elsewhere.html"
    moved.write_bytes(page.read_bytes())
    for name in PLOTS:
        (tmp_path / "out" / name).unlink()
    text = moved.read_text()
    assert text.count("data:image/png;base64,") == 4
    assert not re.search(r'src="(?!data:)', text)


def test_different_teachers_are_flagged(tmp_path):
    a = write_run(tmp_path / "a", "kd", AFTER["kd"])
    other_teacher = {d: 2 * v for d, v in TEACHER.items()}
    b = write_run(tmp_path / "b", "ddk", AFTER["ddk"], teacher=other_teacher)
    write_report([a, b], tmp_path / "out")
    s = summarize_runs([a, b])
    assert s["teacher_mismatch"] and s["teacher"] == TEACHER
    assert s["runs"][1]["worst_ratio"] == pytest.approx(AFTER["ddk"]["math"] / 24.0)
    assert "different teacher perplexities" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.parametrize(
    "junk",
    [
        b'{"domains": {"a": "x"}}\n',
        b'{"event": "final_eval", "step": 100, "domains": {"a": "x"}}\n',
        b"[1, 2, 3]\n",
        bytes(range(256)) * 4,
    ],
)
def test_report_on_foreign_metrics_lines_is_handled_or_one_line(tmp_path, capsys, junk):
    """Lines ddk did not write (or a binary file) are skipped: the report is written from the
    rest, or, with nothing usable left, stops in one line; never a traceback."""
    run = write_run(tmp_path / "run", "ddk", AFTER["ddk"])
    metrics = run / "metrics.jsonl"
    if junk.startswith(b"{") or junk.startswith(b"["):
        metrics.write_bytes(metrics.read_bytes() + junk)
        assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    else:
        metrics.write_bytes(junk)
        assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 2
        assert "has no evaluation records" in capsys.readouterr().err


def test_a_teacher_per_domain_is_named_per_row(two_runs, tmp_path):
    """A run with model.teachers: the domain table names each domain's teacher."""
    kd, _ = two_runs
    cfg = yaml.safe_load((kd / "config.yaml").read_text())
    domain = next(iter(AFTER["kd"]))
    cfg["model"]["teachers"] = {domain: "models/math-teacher"}
    (kd / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = summarize_runs([kd])
    assert summary["domain_teachers"][domain] == "models/math-teacher"
    assert summary["runs"][0]["label"] == "kd+domain"
    assert {t for d, t in summary["domain_teachers"].items() if d != domain} == {"t"}
    write_report([kd], tmp_path / "out")
    table = (tmp_path / "out" / "summary.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith(f"| {domain} "))
    assert "models/math-teacher" in row and "teacher per domain" in table
    assert summarize_runs([two_runs[1]])["domain_teachers"] is None
