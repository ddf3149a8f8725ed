"""A teacher per domain with `teacher.tokenizer: cross`: each teacher (its own tokenizer or the
student's) runs through the cross-tokenizer path on its own rows, and each domain's Eq. 1 ratio
is against its own teacher's NLL over the same bytes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ddk.config import PrepareSection, load_config
from ddk.data.dataset import PreparedData
from ddk.data.prepare import prepare
from ddk.demo.build import tiny_causal_lm, train_bpe_tokenizer
from ddk.logits import hidden_and_head
from ddk.losses.chunked import fused_distill_loss
from ddk.teacher.crosstok import CrossTokenizerTeacher
from ddk.teacher.per_domain import PerDomainTeachers
from ddk.teacher.signals import Batch, CompositeSignal, CrossSignal
from ddk.trainer import Trainer
from tests.conftest import run_config, write_config


@pytest.fixture(scope="module")
def spans_data(tmp_path_factory, corpus, tokenizer_dir):
    out = tmp_path_factory.mktemp("xdprep") / "data"
    cfg = PrepareSection(input=str(corpus[0]), output=str(out), seq_len=32, val_sequences=4,
                         byte_spans=True)  # fmt: skip
    prepare(cfg, str(tokenizer_dir), progress=False)
    return PreparedData(out)


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
