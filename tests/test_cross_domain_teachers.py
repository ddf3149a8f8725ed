"""A teacher per domain with `teacher.tokenizer: cross`: each teacher (its own tokenizer or the
student's) runs through the cross-tokenizer path on its own rows, and each domain's Eq. 1 ratio
is against its own teacher's NLL over the same bytes."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from tokenizers import normalizers
from transformers import AutoModelForCausalLM, AutoTokenizer

from ddk.cli import main
from ddk.config import load_config
from ddk.demo.build import tiny_causal_lm, train_bpe_tokenizer
from ddk.logits import hidden_and_head
from ddk.losses.chunked import fused_distill_loss
from ddk.metrics import read_metrics
from ddk.models import load_model
from ddk.run_dir import start_run
from ddk.teacher.crosstok import CrossTokenizerTeacher
from ddk.teacher.per_domain import PerDomainTeachers
from ddk.teacher.signals import Batch, CompositeSignal, CrossSignal
from ddk.trainer import Trainer
from tests import test_crosstok_teacher
from tests.conftest import one_error_line, run_config, write_config
from tests.test_crosstok_teacher import _lossy_teacher
from tests.test_sharding import _assert_same_run, _env, _torchrun, needs_torchrun
from tests.test_sharding import _config as sharded_config

spans_data = test_crosstok_teacher.spans_data  # the same byte-span data, built per module


@pytest.fixture(scope="module")
def code_teacher(tmp_path_factory, corpus):
    """The "code teacher of another family": its own 200-token tokenizer, saved to a folder."""
    texts = [t for d in corpus[1].values() for t in d]
    tok_dir = train_bpe_tokenizer(texts, 200, tmp_path_factory.mktemp("xdtok"), split_digits=True)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    path = tmp_path_factory.mktemp("code_teacher")
    tiny_causal_lm(len(tok), hidden_size=32, seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _cross(folder, student_dir, data, domains=None):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok, s_tok = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(student_dir)
    return CrossTokenizerTeacher(model, tok, s_tok, data, chunk=50, domains=domains)


def _batch(data, rows):
    seqs = torch.cat([data.domains[data.names[d]].sequences("train", [j]) for d, j in rows])
    return seqs[:, :-1], seqs[:, 1:]


def test_each_row_gets_its_own_teachers_cross_signal(spans_data, code_teacher, teacher_dir,
                                                      student_dir):  # fmt: skip
    """A micro-batch mixing code rows (the other-tokenizer teacher) and other rows (a teacher
    of the student's tokenizer): one part per teacher, each that teacher's own signal over its
    rows; a micro-batch of one teacher's rows gets its signal unchanged."""
    names = spans_data.names
    mapping = {d: str(code_teacher if d == "code" else teacher_dir) for d in names}
    teachers = {str(t): _cross(t, student_dir, spans_data) for t in (teacher_dir, code_teacher)}
    source = PerDomainTeachers(teachers, mapping)
    code = names.index("code")
    rows = np.array([[code, 0], [(code + 1) % 3, 1], [code, 2], [(code + 2) % 3, 3]])
    input_ids, labels = _batch(spans_data, rows)
    signal = source.signal(Batch(input_ids, rows))
    assert isinstance(signal, CompositeSignal) and len(signal.parts) == 2
    L = input_ids.shape[1]
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval().requires_grad_(False)
    hidden, head = hidden_and_head(student, input_ids)
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    kw = dict(vocab_size=spans_data.vocab_size, gamma=1.0, tau=1.0, divergence="forward_kl",
              chunk_tokens=16)  # fmt: skip
    by_parts = 0.0
    for (tokens, part), mine in zip(signal.parts, ([1, 3], [0, 2])):
        assert tokens.tolist() == [r * L + p for r in mine for p in range(L)]
        own = teachers[mapping[names[rows[mine[0], 0]]]].signal(Batch(input_ids[mine], rows[mine]))
        torch.testing.assert_close(part.hidden, own.hidden)
        assert torch.equal(part.mode, own.mode) and part.teacher_vocab == own.teacher_vocab
        by_parts += float(fused_distill_loss(hidden[tokens], head.weight, labels[tokens], own,
                                             **kw).total)  # fmt: skip
    whole = fused_distill_loss(hidden, head.weight, labels, signal, **kw)
    assert float(whole.div) > 0 and math.isclose(float(whole.total), by_parts, rel_tol=1e-6)
    only = source.signal(Batch(input_ids[[0, 2]], rows[[0, 2]]))
    assert isinstance(only, CrossSignal) and only.teacher_vocab == teachers[str(code_teacher)].vocab


def _config(tmp_path, teacher, student_dir, data, **extra) -> dict:
    return run_config(tmp_path / "run", str(teacher), str(student_dir), str(data.folder),
                      **{"teacher.tokenizer": "cross", **extra})  # fmt: skip


def test_eq1_ratio_is_each_domains_own_teacher_per_byte(tmp_path, spans_data, code_teacher,
                                                        teacher_dir, student_dir):  # fmt: skip
    """RUN/teacher_ppl.json: code against the code teacher, the rest against the default, each
    that teacher's single-teacher cross-tokenizer perplexity (student-token units and per
    byte); the key names each domain's teacher."""
    values = _config(
        tmp_path,
        teacher_dir,
        student_dir,
        spans_data,
        **{"model.teachers": {"code": str(code_teacher)}, "distill.method": "ddk"},
    )
    cfg_path = write_config(tmp_path / "c.yaml", values)
    trainer = Trainer(load_config(cfg_path), tmp_path / "run")
    ppl = trainer.teacher_perplexities()["val"]
    record = json.loads((tmp_path / "run" / "teacher_ppl.json").read_text())
    for teacher in (code_teacher, teacher_dir):
        alone = _cross(teacher, student_dir, spans_data).details("val")
        for d in spans_data.names:
            if (d == "code") == (teacher == code_teacher):
                assert ppl[d] == pytest.approx(alone[d]["ppl"], rel=1e-6)
                assert record["ppl_byte"]["val"][d] == pytest.approx(alone[d]["ppl_byte"], rel=1e-6)
                assert record["key"]["teachers"][d] == str(teacher)
    assert record["key"]["teacher"]["code"]["cross_tokenizer"] is True


# ---------------------------------------------------------------- what is refused, in one line
def _refused(tmp_path, values, capsys) -> str:
    capsys.readouterr()
    assert main(["distill", write_config(tmp_path / "c.yaml", values)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
    return line


@pytest.mark.parametrize("mode", ["offline", "served"])
def test_cross_teachers_per_domain_run_online_only(tmp_path, mode, spans_data, code_teacher,
                                                   teacher_dir, student_dir, capsys):  # fmt: skip
    extra = {"teacher.mode": mode, "teacher.cache": str(tmp_path / "cache"),
             "teacher.url": "http://localhost:1", "model.teachers": {"code": str(code_teacher)}}  # fmt: skip
    line = _refused(tmp_path, _config(tmp_path, teacher_dir, student_dir, spans_data, **extra),
                    capsys)  # fmt: skip
    assert "teacher.tokenizer: cross with model.teachers runs online only" in line


def test_no_cache_of_cross_teachers_per_domain(tmp_path, spans_data, code_teacher, teacher_dir,
                                               student_dir, capsys):  # fmt: skip
    """`ddk cache-teacher` would write one teacher's cache: refused in one line, no folder."""
    extra = {
        "teacher.cache": str(tmp_path / "cache"),
        "model.teachers": {"code": str(code_teacher)},
    }
    values = _config(tmp_path, teacher_dir, student_dir, spans_data, **extra)
    capsys.readouterr()
    assert main(["cache-teacher", write_config(tmp_path / "c.yaml", values)]) == 2
    assert "runs online only" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "cache").exists()


def test_each_teachers_tokenizer_must_give_its_domains_text_back(
    tmp_path, spans_data, teacher_dir, student_dir, capsys
):
    """A lowercasing tokenizer (and no weights) as the math teacher: named, with the math text
    it changes, before any weights load. The same tokenizer for code, whose text has no capital
    letters, passes that check (the run then stops at the missing weights)."""
    lossy = _lossy_teacher(tmp_path / "lossy", normalizers.Lowercase(), student_dir)
    values = _config(tmp_path, teacher_dir, student_dir, spans_data,
                     **{"model.teachers": {"math": str(lossy)}})  # fmt: skip
    line = _refused(tmp_path, values, capsys)
    assert "problem(s): model.teachers.math: its tokenizer does not give the data" in line
    assert "(domain 'math', " in line
    values["model.teachers"] = {"code": str(lossy)}
    assert "does not give the data's text back" not in _refused(tmp_path, values, capsys)


def test_cross_teachers_per_domain_need_byte_spans(tmp_path, prepared_dir, code_teacher,
                                                   teacher_dir, student_dir, capsys):  # fmt: skip
    values = run_config(tmp_path / "run", str(teacher_dir), str(student_dir), str(prepared_dir),
                        **{"teacher.tokenizer": "cross",
                           "model.teachers": {"code": str(code_teacher)}})  # fmt: skip
    assert "prepare.byte_spans: true" in _refused(tmp_path, values, capsys)


# ---------------------------------------------------------------- end to end
def _train(tmp_path, name, teacher, student_dir, data, **extra):
    run_dir = tmp_path / name
    values = run_config(run_dir, str(teacher), str(student_dir), str(data.folder),
                        **{"teacher.tokenizer": "cross", "distill.method": "ddk",
                           "trainer.max_steps": 8, **extra})  # fmt: skip
    start_run(load_config(write_config(tmp_path / f"{name}.yaml", values)))
    logs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    weights = load_model(str(run_dir / "final"), dtype=torch.float32, what="student")
    return logs, weights.state_dict(), run_dir


@pytest.mark.slow
def test_a_copy_of_the_teacher_for_one_domain_equals_the_single_cross_teacher_run(
    tmp_path, spans_data, teacher_dir, student_dir
):
    """math mapped to a copy of the (student-tokenizer) teacher: two cross-tokenizer teachers,
    mixed micro-batches take the composite signal, and the run matches the single-teacher
    cross-tokenizer run to float rounding."""
    copy = tmp_path / "teacher_copy"
    shutil.copytree(teacher_dir, copy)
    base_logs, base_weights, _ = _train(tmp_path, "single", teacher_dir, student_dir, spans_data)
    logs, weights, _ = _train(tmp_path, "copy", teacher_dir, student_dir, spans_data,
                              **{"model.teachers": {"math": str(copy)}})  # fmt: skip
    assert len(base_logs) > 2 and [r["step"] for r in logs] == [r["step"] for r in base_logs]
    for a, b in zip(logs, base_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
    for key, value in base_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-5)
    # every domain mapped to the teacher itself: the one-teacher run, bit for bit
    same = {d: str(teacher_dir) for d in spans_data.names}
    logs, weights, _ = _train(tmp_path, "same", teacher_dir, student_dir, spans_data,
                              **{"model.teachers": same})  # fmt: skip
    assert [r["loss"] for r in logs] == [r["loss"] for r in base_logs]
    assert all(torch.equal(weights[k], v) for k, v in base_weights.items())


@pytest.mark.slow
@pytest.mark.parametrize("mismatch", ["uld", "merge"])
def test_teachers_of_different_tokenizers_train_the_student(
    tmp_path, mismatch, spans_data, code_teacher, teacher_dir, student_dir
):
    """The code teacher with its own tokenizer, the default teacher elsewhere: the loss is
    finite and falls, and each domain's ratio is against its own teacher."""
    logs, _, run_dir = _train(tmp_path, "run", teacher_dir, student_dir, spans_data,
                              **{"model.teachers": {"code": str(code_teacher)},
                                 "distill.cross_mismatch": mismatch,
                                 "trainer.max_steps": 12})  # fmt: skip
    losses = [r["loss"] for r in logs]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(r["kl"] > 0 for r in logs)
    record = json.loads((run_dir / "teacher_ppl.json").read_text())
    assert record["key"]["teachers"]["code"] == str(code_teacher)
    alone = _cross(code_teacher, student_dir, spans_data, ["code"]).details("val")["code"]
    assert record["ppl"]["val"]["code"] == pytest.approx(alone["ppl"], rel=1e-6)
    assert record["ppl_byte"]["val"]["code"] == pytest.approx(alone["ppl_byte"], rel=1e-6)


@pytest.mark.slow
@needs_torchrun
def test_two_processes_with_cross_teachers_per_domain_match_one_teacher(
    tmp_path, spans_data, teacher_dir, student_dir
):
    """2 gloo processes (DDP) with math mapped to a copy of the teacher, through the cross
    path: composite signals cross the DDP forward, and the run equals the one-process
    single-teacher cross run with the same global batch."""
    copy = tmp_path / "teacher_copy"
    shutil.copytree(teacher_dir, copy)
    runs = {}
    for name, micro, teachers in (("one", 4, {}), ("two", 2, {"math": str(copy)})):
        cfg = sharded_config(tmp_path / f"{name}.yaml", tmp_path / name, str(teacher_dir),
                      str(student_dir), str(spans_data.folder), micro, 2)  # fmt: skip
        values = yaml.safe_load(cfg.read_text())
        values["teacher"]["tokenizer"] = "cross"
        values["model"]["teachers"] = teachers
        cfg.write_text(yaml.safe_dump(values))
        runs[name] = cfg
    _torchrun(["distill", str(runs["one"])], _env(), processes=1)
    _torchrun(["distill", str(runs["two"])], _env())
    _assert_same_run(tmp_path / "one", tmp_path / "two")
