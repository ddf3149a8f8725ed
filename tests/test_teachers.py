"""A teacher per domain (`model.teachers`): the block-diagonal signal against a naive
reference, each row's signal from its own teacher, Eq. 1 against each domain's own teacher,
a mapping onto one model equal to today's single-teacher run (online and offline), the
per-domain offline cache, and the one-line refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from ddk.cli import main
from ddk.commands.cache_teacher import build_cache
from ddk.data.dataset import PreparedData
from ddk.demo.run import split_variant
from ddk.errors import DDKError
from ddk.evaluate import domain_perplexities
from ddk.logits import LogitTransform
from ddk.metrics import read_metrics
from ddk.models import load_model
from ddk.run_dir import start_run
from ddk.teacher.online import OnlineTeacher
from ddk.teacher.per_domain import PerDomainTeachers, merge_dense, teacher_groups
from ddk.teacher.placement import teachers_fit_problem
from ddk.teacher.signals import Batch, DenseSignal
from ddk.trainer import Trainer
from tests.conftest import TINY_RUN, make_config, one_error_line, run_config, write_config
from tests.test_sharding import (
    _assert_same_run,
    _config,
    _env,
    _torchrun,
    needs_torchrun,
)
from tests.test_sharding import (
    one_process_run as single_teacher_run,  # noqa: F401 (a fixture: the one-process run)
)

GIB = 2**30


# ---------------------------------------------------------------- the merged signal (pure math)
def _logits(signal: DenseSignal) -> torch.Tensor:
    z = F.linear(signal.hidden, signal.head_weight, signal.head_bias).float()
    return z if signal.transform is None else signal.transform(z)


@pytest.mark.parametrize(
    "bias, transforms",
    [
        ((False, False), (None, None)),
        ((True, False), (LogitTransform(0.5), None)),
        ((True, True), (LogitTransform(2.0, 30.0), LogitTransform(0.25, 30.0))),
    ],
)
def test_merged_signal_gives_each_row_its_own_teachers_logits(bias, transforms):
    """Rows of a micro-batch split between two teachers of other widths, vocabularies (padded
    heads), biases and logit scales: each row's merged logits are its own teacher's."""
    g = torch.Generator().manual_seed(0)
    B, L, V = 5, 3, 11
    rows = [np.array([0, 3]), np.array([1, 2, 4])]
    parts, reference = [], torch.zeros(B * L, V)
    for r, H, extra, has_bias, t in zip(rows, (4, 6), (0, 2), bias, transforms):
        hidden = torch.randn(len(r) * L, H, generator=g, dtype=torch.float64)
        head = torch.randn(V + extra, H, generator=g, dtype=torch.float64)
        b = torch.randn(V + extra, generator=g, dtype=torch.float64) if has_bias else None
        signal = DenseSignal(hidden, head, b, t)
        parts.append((r, signal))
        tokens = (r[:, None] * L + np.arange(L)).reshape(-1)
        reference[tokens] = _logits(signal)[:, :V].float()
    merged = merge_dense(parts, B, L)
    assert merged.hidden.shape[0] == B * L
    torch.testing.assert_close(_logits(merged)[:, :V].float(), reference, rtol=1e-6, atol=1e-6)


def test_teachers_with_other_softcaps_cannot_share_a_micro_batch():
    h, w = torch.zeros(2, 2), torch.zeros(3, 2)
    parts = [
        (np.array([0]), DenseSignal(h, w, None, LogitTransform(1.0, 30.0))),
        (np.array([1]), DenseSignal(h, w, None, None)),
    ]
    with pytest.raises(Exception, match="soft-cap"):
        merge_dense(parts, 2, 2)


def test_teacher_groups_keep_first_use_order():
    mapping = {"code": "b", "prose": "a", "math": "b"}
    assert teacher_groups(mapping) == {"b": ["code", "math"], "a": ["prose"]}


# ---------------------------------------------------------------- how many teachers fit
def test_teachers_fit_the_devices_given():
    two = {"a": 6 * GIB, "b": 6 * GIB}
    # replicated: every device holds both (12 GiB) within half of the free memory
    assert teachers_fit_problem(two, "replicated", free_bytes=24 * GIB, world_size=1) is None
    problem = teachers_fit_problem(two, "replicated", free_bytes=20 * GIB, world_size=4)
    assert problem.startswith("model.teachers: 2 teachers") and "replicated" in problem
    # sharded over 2 processes: 6 GiB each
    assert teachers_fit_problem(two, "sharded", free_bytes=12 * GIB, world_size=2) is None
    assert "sharded over 2" in teachers_fit_problem(two, "auto", free_bytes=8 * GIB, world_size=2)
    # one process cannot shard: auto holds them whole
    assert teachers_fit_problem(two, "auto", free_bytes=20 * GIB, world_size=1) is not None
    # offloaded shards, a CPU run and a single teacher are never refused here
    assert teachers_fit_problem(two, "cpu_offload", free_bytes=GIB, world_size=2) is None
    assert teachers_fit_problem(two, "replicated", free_bytes=None, world_size=1) is None
    assert teachers_fit_problem({"a": 60 * GIB}, "replicated", free_bytes=GIB, world_size=1) is None


# ---------------------------------------------------------------- real teachers
@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory, tokenizer_dir, save_model):
    """A second teacher of another width (the "math teacher")."""
    return save_model(tmp_path_factory.mktemp("teacher_b"), tokenizer_dir, hidden_size=40, seed=7)


@pytest.fixture(scope="module")
def teacher_copy(tmp_path_factory, teacher_dir):
    """The same weights in another folder: a second teacher that must change nothing."""
    dest = tmp_path_factory.mktemp("teacher_copy") / "t"
    shutil.copytree(teacher_dir, dest)
    return dest


def test_each_row_gets_its_own_teachers_signal(teacher_dir, other_teacher, prepared_dir):
    """A micro-batch mixing domains of two teachers: each row's logits are its own teacher's
    forward over that row."""
    data = PreparedData(prepared_dir)
    models = {
        str(t): load_model(str(t), dtype=torch.float32, what="teacher")
        for t in (teacher_dir, other_teacher)
    }
    mapping = {d: str(other_teacher if d == "math" else teacher_dir) for d in data.names}
    source = PerDomainTeachers({n: OnlineTeacher(m) for n, m in models.items()}, mapping)
    math = data.names.index("math")
    rows = np.array([[math, 0], [0, 1], [math, 2], [1, 3]])
    seqs = torch.cat([data.domains[data.names[d]].sequences("train", [j]) for d, j in rows])
    ids = seqs[:, :-1]
    merged = _logits(source.signal(Batch(ids, rows))).reshape(len(rows), ids.shape[1], -1)
    for i, (d, _) in enumerate(rows):
        own = models[mapping[data.names[d]]](input_ids=ids[i : i + 1]).logits[0].float()
        torch.testing.assert_close(merged[i], own, rtol=1e-5, atol=1e-5)
    # one teacher's rows only: its signal, untouched
    only = source.signal(Batch(ids[[0, 2]], rows[[0, 2]]))
    assert only.head_weight is models[str(other_teacher)].get_output_embeddings().weight


def test_eq1_ratio_uses_each_domains_own_teacher(
    tmp_path, teacher_dir, other_teacher, student_dir, prepared_dir
):
    """RUN/teacher_ppl.json and the ratios: math against the math teacher, the rest against
    the default one, each as that teacher's own held-out perplexity."""
    cfg = make_config(
        tmp_path / "run", teacher_dir, student_dir, prepared_dir,
        **{"model.teachers": {"math": str(other_teacher)}, "distill.method": "ddk"},
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run")
    ppl = trainer.teacher_perplexities()["val"]
    data = PreparedData(prepared_dir)
    for teacher, domains in ((other_teacher, ["math"]), (teacher_dir, ["code", "prose"])):
        model = load_model(str(teacher), dtype=torch.float32, what="teacher")
        own = domain_perplexities(
            model, data, vocab_size=data.vocab_size, batch_size=4, chunk_tokens=50, domains=domains
        )
        for d in domains:
            assert ppl[d] == pytest.approx(own[d]["ppl"], rel=1e-6)
    record = json.loads((tmp_path / "run" / "teacher_ppl.json").read_text())
    assert record["key"]["teachers"]["math"] == str(other_teacher)
    assert record["key"]["teachers"]["code"] == str(teacher_dir)


def _run(cfg, run_dir):
    start_run(cfg)
    logs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    weights = load_model(str(run_dir / "final"), dtype=torch.float32, what="student")
    return logs, weights.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["online", "offline"])
def test_one_model_for_every_domain_equals_the_single_teacher_run(
    tmp_path, mode, teacher_dir, teacher_copy, student_dir, prepared_dir
):
    """`model.teachers` mapping every domain to the teacher's model: the same losses and
    weights as the run without it, bit for bit; math mapped to a copy of the teacher (a second
    teacher, so mixed micro-batches take the merged signal) agrees to float rounding."""
    results = {}
    mappings = {
        "single": {},
        "same": {d: str(teacher_dir) for d in ("code", "prose", "math")},
        "copy": {"math": str(teacher_copy)},
    }
    for name, teachers in mappings.items():
        extra = {"model.teachers": teachers, "distill.method": "ddk", "trainer.max_steps": 8}
        if mode == "offline":
            cache = tmp_path / f"cache_{name}"
            extra.update({"teacher.mode": "offline", "teacher.cache": str(cache)})
            extra.update({"teacher.cache_k": 8, "teacher.cache_samples": 4})
            build_cache(make_config("x", teacher_dir, student_dir, prepared_dir, **extra), False)
        run_dir = tmp_path / name
        cfg = make_config(run_dir, teacher_dir, student_dir, prepared_dir, **extra)
        results[name] = _run(cfg, run_dir)
    base_logs, base_weights = results["single"]
    assert len(base_logs) > 2
    for name, tolerance in (("same", 0.0), ("copy", 1e-5)):
        logs, weights = results[name]
        assert [r["step"] for r in logs] == [r["step"] for r in base_logs]
        for a, b in zip(logs, base_logs):
            assert a["loss"] == pytest.approx(b["loss"], rel=tolerance, abs=tolerance)
        for key, value in base_weights.items():
            torch.testing.assert_close(weights[key], value, rtol=tolerance, atol=tolerance)


# ---------------------------------------------------------------- the per-domain offline cache
@pytest.fixture(scope="module")
def two_teacher_cache(tmp_path_factory, teacher_dir, other_teacher, student_dir, prepared_dir):
    folder = tmp_path_factory.mktemp("cache2") / "c"
    cfg = make_config(
        "x", teacher_dir, student_dir, prepared_dir, base={},
        **{"model.teachers": {"math": str(other_teacher)}, "teacher.cache": str(folder),
           "teacher.cache_k": 4, "teacher.cache_samples": 2},
    )  # fmt: skip
    build_cache(cfg, progress=False)
    return folder


def test_cache_holds_each_domain_from_its_own_teacher(
    tmp_path, two_teacher_cache, teacher_dir, other_teacher, student_dir, prepared_dir
):
    """One cache folder, per-domain teachers and fingerprints; each domain's shards and
    perplexities are the ones a single-teacher cache of its own teacher holds."""
    m = json.loads((two_teacher_cache / "manifest.json").read_text())
    assert m["domains"]["math"]["teacher"] == str(other_teacher)
    assert m["domains"]["code"]["teacher"] == str(teacher_dir)
    assert (
        m["domains"]["math"]["teacher_fingerprint"] != m["domains"]["code"]["teacher_fingerprint"]
    )
    alone = tmp_path / "alone"
    cfg = make_config(
        "x", other_teacher, student_dir, prepared_dir, base={},
        **{"teacher.cache": str(alone), "teacher.cache_k": 4, "teacher.cache_samples": 2},
    )  # fmt: skip
    build_cache(cfg, progress=False)
    single = json.loads((alone / "manifest.json").read_text())
    folder = m["domains"]["math"]["folder"]
    shards = sorted(p.relative_to(alone) for p in (alone / folder).rglob("*") if p.is_file())
    assert shards
    for shard in shards:
        assert (two_teacher_cache / shard).read_bytes() == (alone / shard).read_bytes()
    assert m["teacher_ppl"]["val"]["math"] == single["teacher_ppl"]["val"]["math"]


def _cli(args, capsys):
    """`ddk ARGS` in this process: (exit status, its one error line)."""
    capsys.readouterr()
    status = main(args)
    return status, one_error_line(capsys.readouterr().err)


def test_cache_of_another_teacher_mapping_is_refused_in_one_line(
    tmp_path, two_teacher_cache, teacher_dir, other_teacher, student_dir, prepared_dir, capsys
):
    base = run_config(tmp_path / "run", teacher_dir, student_dir, prepared_dir, TINY_RUN)
    offline = {"teacher.mode": "offline", "teacher.cache": two_teacher_cache, "teacher.cache_k": 4}
    for teachers in ({}, {"code": str(other_teacher), "math": str(other_teacher)}):
        path = write_config(tmp_path / "c.yaml", {**base, **offline, "model.teachers": teachers})
        status, line = _cli(["distill", path], capsys)
        assert status == 2
        assert "another teacher mapping" in line and "model.teachers" in line
        assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "teachers, expected",
    [
        ({"poetry": "TEACHER"}, "model.teachers: 'poetry' is not a domain of the run"),
        ({"math": "/nonexistent/teacher"}, "model.teachers.math: "),
    ],
)
def test_bad_teacher_mapping_is_one_line_before_weights_load(
    tmp_path, teachers, expected, teacher_dir, student_dir, prepared_dir, capsys
):
    teachers = {d: str(teacher_dir) if t == "TEACHER" else t for d, t in teachers.items()}
    values = run_config(tmp_path / "run", teacher_dir, student_dir, prepared_dir, TINY_RUN)
    path = write_config(tmp_path / "c.yaml", {**values, "model.teachers": teachers})
    status, line = _cli(["distill", path], capsys)
    assert status == 2 and expected in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_teachers_without_a_default_teacher_is_refused(tmp_path, student_dir, prepared_dir, capsys):
    values = run_config(tmp_path / "run", None, student_dir, prepared_dir, TINY_RUN)
    path = write_config(tmp_path / "c.yaml", {**values, "model.teachers": {"math": "x"}})
    status, line = _cli(["distill", path], capsys)
    assert status == 2 and "model.teachers needs model.teacher" in line
    assert "model.student" not in line  # the rest of the model section is kept and checked


@pytest.mark.parametrize("placement", ["sharded", "cpu_offload"])
def test_a_placement_one_process_cannot_give_is_refused_before_weights_load(
    tmp_path, placement, teacher_dir, other_teacher, student_dir, prepared_dir, capsys
):
    """A student folder without weights: a refusal that comes after the student loads would
    name its missing weight file instead."""
    student = tmp_path / "student"
    shutil.copytree(student_dir, student, ignore=shutil.ignore_patterns("*.safetensors"))
    values = run_config(tmp_path / "run", teacher_dir, student, prepared_dir, TINY_RUN)
    values.update({"model.teachers": {"math": str(other_teacher)}, "teacher.placement": placement})
    status, line = _cli(["distill", write_config(tmp_path / "c.yaml", values)], capsys)
    assert status == 2 and f"teacher.placement={placement} needs a distributed launch" in line
    assert not (tmp_path / "run").exists()


def test_demo_names_runs_with_a_teacher_per_domain():
    assert split_variant("ddk+domain") == ("ddk", "domain")
    assert split_variant("kd+domain") == ("kd", "domain")
    with pytest.raises(DDKError, match="METHOD\\+domain"):
        split_variant("cpt+domain")  # CE only: no teacher to map


@pytest.mark.slow
@needs_torchrun
def test_two_processes_with_sharded_teachers_match_one_teacher(
    tmp_path,
    single_teacher_run,  # noqa: F811 (the imported fixture)
    teacher_dir,
    teacher_copy,
    student_dir,
    prepared_dir,  # noqa: F811
):
    """2 gloo processes, each teacher sharded (FSDP2, forward only): a rank whose micro-batch
    has no row of a teacher still joins that teacher's collectives. With math mapped to a copy
    of the teacher the run equals the one-process single-teacher run."""
    cfg = _config(
        tmp_path / "two.yaml", tmp_path / "two", teacher_dir, student_dir, prepared_dir, 2, 2,
        placement="sharded",
    )  # fmt: skip
    values = yaml.safe_load(cfg.read_text())
    values["model"]["teachers"] = {"math": str(teacher_copy)}
    cfg.write_text(yaml.safe_dump(values))
    done = _torchrun(["distill", str(cfg)], _env())
    assert done.stdout.count("teacher placement: sharded") == 2
    _assert_same_run(single_teacher_run, tmp_path / "two")
