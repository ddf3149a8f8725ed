"""`ddk cache-teacher` for a teacher with another tokenizer (`teacher.tokenizer: cross`, cache
format 3) and `teacher.mode: offline` reading it: round trip, resume, refusals, and offline
training against the online cross-tokenizer run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ddk.cli import main
from ddk.commands.cache_teacher import build_cache
from ddk.demo.build import tiny_causal_lm
from ddk.lock import LOCK_NAME
from ddk.losses.crosstok_sparse import sparse_cross_rows
from ddk.metrics import read_metrics
from ddk.run_dir import resume_run, start_run
from ddk.teacher import cache_format
from ddk.teacher.cache_format import read_cache_manifest
from ddk.teacher.crosstok import CrossTokenizerTeacher
from ddk.teacher.offline import OfflineTeacher
from ddk.teacher.retokenize import shared_vocabulary
from ddk.teacher.signals import Batch, SparseCrossSignal
from tests import test_crosstok_teacher as online
from tests.conftest import make_config, one_error_line, tree_digest
from tests.test_teacher_cache import cache_teacher_on_two_processes, shard_writer_killed_after

# the online tests' data with byte spans and teacher with another tokenizer
spans_data, other_teacher, other_teacher_dir = (
    online.spans_data, online.other_teacher, online.other_teacher_dir
)  # fmt: skip

# end-to-end on the tiny models: outside the fast tier (pytest -m 'not slow')
pytestmark = pytest.mark.slow

K = 16
RUN = {
    "trainer.max_steps": 4,
    "trainer.micro_batch_size": 4,
    "trainer.lr": 3e-3,
    "trainer.min_lr": 3e-4,
    "trainer.warmup_steps": 2,
    "trainer.log_every": 1,
    "trainer.save_every": 4,
    "trainer.eval_batch_size": 8,
    "distill.K": 2,
    "distill.loss_chunk_tokens": 64,
}


def config(teacher, student, data, cache, *extra):
    overrides = {"teacher.cache": cache, "teacher.cache_k": K, "teacher.tokenizer": "cross"}
    overrides.update(item.split("=", 1) for item in extra)
    return make_config("runs/x", teacher, student, data, RUN, **overrides)


@pytest.fixture(scope="module")
def cross_cache(tmp_path_factory, other_teacher_dir, student_dir, spans_data):
    folder = tmp_path_factory.mktemp("xcache") / "c"
    build_cache(config(other_teacher_dir, student_dir, spans_data.folder, folder), progress=False)
    return folder


def test_cross_cache_holds_the_live_teachers_rows(cross_cache, other_teacher, student_dir,
                                                  spans_data):  # fmt: skip
    """Format 3: the manifest (teacher vocabulary, shared strings, bytes per token), shard
    sizes, and rows read back through `teacher.mode: offline` equal to the live
    cross-tokenizer teacher's top-k rows (log-probs to float16)."""
    model, tok = other_teacher
    s_tok = AutoTokenizer.from_pretrained(student_dir)
    m = read_cache_manifest(cross_cache)
    assert m["format_version"] == 3 and m["tokenizer"] == "cross" and m["complete"]
    assert m["teacher_vocab_size"] == len(tok) and m["samples"] == 0
    assert m["bytes_per_token"] == K * (2 + 2) + 4 + 4 + 1
    for info in m["domains"].values():
        size = sum(p.stat().st_size for p in (cross_cache / info["folder"]).glob("*.bin"))
        assert size == info["sequences"] * spans_data.seq_len * m["bytes_per_token"]
    s_ids, t_ids = shared_vocabulary(s_tok, tok)
    stored = np.load(cross_cache / "shared.npy")
    assert np.array_equal(stored, np.stack([s_ids, t_ids])) and m["shared_strings"] == len(s_ids)

    live = CrossTokenizerTeacher(model, tok, s_tok, spans_data)
    assert m["teacher_ppl"]["val"] == pytest.approx(live.perplexities("val"), rel=1e-5)
    offline = OfflineTeacher(cross_cache, spans_data.names, torch.device("cpu"), "sampled")
    rows = np.array([[0, 1], [2, 0], [1, 3]])
    inputs = torch.stack([spans_data.domains[spans_data.names[d]].train_batch([j])[0][0]
                          for d, j in rows])  # fmt: skip
    got = offline.signal(Batch(inputs, rows))
    want = sparse_cross_rows(live.signal(Batch(inputs, rows)), K, 1.0)
    assert isinstance(got, SparseCrossSignal)
    assert torch.equal(got.mode, want.mode) and (got.ids == want.ids).float().mean() > 0.99
    torch.testing.assert_close(got.logp, want.logp, atol=4e-3, rtol=0)
    torch.testing.assert_close(got.log_tail, want.log_tail)
    torch.testing.assert_close(got.log_shared, want.log_shared)
    assert torch.equal(got.student_shared, torch.as_tensor(s_ids))


def tree(folder):
    return tree_digest(folder, ignore=(LOCK_NAME,))


def test_interrupted_cross_cache_resumes_to_same_bytes(
    tmp_path, cross_cache, other_teacher_dir, student_dir, spans_data
):
    folder = tmp_path / "c"
    cfg = config(other_teacher_dir, student_dir, spans_data.folder, folder)
    with pytest.raises(RuntimeError, match="killed"):
        build_cache(cfg, progress=False, write_shard=shard_writer_killed_after(1))
    assert not read_cache_manifest(folder)["complete"]
    assert len(list(folder.rglob("*.bin"))) == 1
    build_cache(cfg, progress=False)
    assert tree(folder) == tree(cross_cache)


def offline(teacher, student, data, cache, run, *extra):
    cfg = config(teacher, student, data, cache, "teacher.mode=offline",
                 f"trainer.output_dir={run}", *extra)  # fmt: skip
    return cfg


def _refused(tmp_path, cfg, capsys) -> str:
    path = tmp_path / "cfg.yaml"
    cfg.save(path)
    assert main(["distill", str(path)]) == 2
    assert not (Path(cfg.trainer.output_dir) / "metrics.jsonl").exists()
    return one_error_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def other_teachers(tmp_path_factory, other_teacher_dir, student_dir):
    """Beside the cached teacher: its weights with another tokenizer (the student's), and
    other weights with its tokenizer."""
    root = tmp_path_factory.mktemp("others")
    same_weights = shutil.copytree(other_teacher_dir, root / "same_weights")
    for f in same_weights.glob("*token*"):
        f.unlink()
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(same_weights)
    other_weights = shutil.copytree(other_teacher_dir, root / "other_weights")
    vocab = AutoTokenizer.from_pretrained(other_teacher_dir)
    tiny_causal_lm(len(vocab), hidden_size=32, seed=11).save_pretrained(other_weights)
    return same_weights, other_weights


@pytest.mark.parametrize(
    "case", ["same_tokenizer", "tokenizer", "weights", "format2", "shared", "merge"]
)
def test_a_cache_for_another_teacher_or_tokenizer_is_refused(
    tmp_path, cross_cache, other_teacher_dir, other_teachers, student_dir, spans_data, capsys,
    case,
):  # fmt: skip
    """One line, exit 2, before any weights load: a cross cache read as a same-tokenizer one,
    a cache whose teacher tokenizer or weights differ from model.teacher's, a same-tokenizer
    cache read with teacher.tokenizer: cross, a changed shared-strings file, and
    cross_mismatch: merge, whose span prefixes a cache does not hold."""
    teacher, cache, extra = other_teacher_dir, cross_cache, []
    if case == "same_tokenizer":
        extra = ["teacher.tokenizer=same"]
    elif case == "tokenizer":
        teacher = other_teachers[0]
    elif case == "weights":
        teacher = other_teachers[1]
    elif case == "merge":
        extra = ["distill.cross_mismatch=merge"]
    elif case == "format2":  # what a same-tokenizer cache's manifest says
        cache = shutil.copytree(cross_cache, tmp_path / "c2")
        m = read_cache_manifest(cache)
        cache_format.write_cache_manifest(cache, {**m, "format_version": 2})
    else:  # the shared strings' ids changed on disk
        cache = shutil.copytree(cross_cache, tmp_path / "c2")
        pairs = np.load(cache / "shared.npy")
        np.save(cache / "shared.npy", pairs[:, ::-1].copy())
    cfg = offline(teacher, student_dir, spans_data.folder, cache, tmp_path / "run", *extra)
    err = _refused(tmp_path, cfg, capsys)
    words = {
        "same_tokenizer": "built for a teacher with another tokenizer",
        "tokenizer": "another teacher tokenizer",
        "weights": "another teacher",
        "format2": "built for a teacher with the student's tokenizer",
        "shared": "shared.npy' does not match its checksum",
        "merge": "cross_mismatch: 'merge' needs teacher.mode 'online'",
    }[case]
    assert words in err, err


def test_cache_teacher_refuses_vllm_for_a_cross_tokenizer_teacher(
    tmp_path, other_teacher_dir, student_dir, spans_data, capsys
):
    cfg = config(other_teacher_dir, student_dir, spans_data.folder, tmp_path / "c",
                 "teacher.engine=vllm")  # fmt: skip
    cfg.save(tmp_path / "cfg.yaml")
    assert main(["cache-teacher", str(tmp_path / "cfg.yaml")]) == 2
    assert "teacher.engine: hf" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "c").exists()


def _logs(run) -> tuple[list, list]:
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if "kl" in r]
    updates = [r for r in records if r.get("event") == "domain_update"]
    return steps, updates


def test_offline_cross_at_full_k_trains_like_online(
    tmp_path, other_teacher_dir, student_dir, spans_data
):
    """k = the teacher's vocabulary: the cache holds the whole distribution, so an offline DDK
    run's per-step loss and KL and its domain weights (Eq. 1 from the cached teacher
    perplexities) equal the online cross-tokenizer run's, to float16 storage."""
    vocab = len(AutoTokenizer.from_pretrained(other_teacher_dir))
    cache = tmp_path / "full"
    full = [f"teacher.cache_k={vocab}"]
    build_cache(config(other_teacher_dir, student_dir, spans_data.folder, cache, *full),
                progress=False)  # fmt: skip
    logs = {}
    for mode in ("online", "offline"):
        start_run(config(other_teacher_dir, student_dir, spans_data.folder, cache, *full,
                         f"teacher.mode={mode}", f"trainer.output_dir={tmp_path / mode}"))  # fmt: skip
        logs[mode] = _logs(tmp_path / mode)
    (on_steps, on_updates), (off_steps, off_updates) = logs["online"], logs["offline"]
    assert len(on_steps) == len(off_steps) == 4 and len(on_updates) == len(off_updates) == 2
    for on, off in zip(on_steps, off_steps):
        assert off["kl"] == pytest.approx(on["kl"], rel=1e-3)
        assert off["loss"] == pytest.approx(on["loss"], rel=1e-3)
    for on, off in zip(on_updates, off_updates):
        for d, v in on["domains"].items():
            assert off["domains"][d]["teacher_ppl"] == pytest.approx(v["teacher_ppl"], rel=1e-5)
            assert off["domains"][d]["weight"] == pytest.approx(v["weight"], rel=1e-3)
    record = json.loads((tmp_path / "offline" / "teacher_ppl.json").read_text())
    assert set(record["source"].values()) == {"teacher cache"}


def test_offline_cross_at_small_k_is_close(tmp_path, cross_cache, other_teacher_dir,
                                           student_dir, spans_data):  # fmt: skip
    """k = 16 of 200: the first step (same student weights) against the online run's: exact
    rows are a lower bound, ULD rows an estimate (run with -s to print the gap)."""
    kl = {}
    for mode in ("online", "offline"):
        start_run(config(other_teacher_dir, student_dir, spans_data.folder, cross_cache,
                         f"teacher.mode={mode}", f"trainer.output_dir={tmp_path / mode}",
                         "trainer.max_steps=1", "distill.method=kd"))  # fmt: skip
        kl[mode] = _logs(tmp_path / mode)[0][0]["kl"]
    gap = kl["offline"] / kl["online"] - 1
    print(f"k={K}: first-step KL online {kl['online']:.5f} offline {kl['offline']:.5f} "
          f"({gap:+.2%})")  # fmt: skip
    assert abs(gap) < 0.5


def test_two_processes_write_the_same_cross_cache(
    tmp_path, cross_cache, other_teacher_dir, student_dir, spans_data
):
    """Under torchrun rank r writes shards r::world: the same shards, byte for byte."""
    cfg = tmp_path / "cfg.yaml"
    config(other_teacher_dir, student_dir, spans_data.folder, tmp_path / "c").save(cfg)
    cache_teacher_on_two_processes(cfg)
    one, two = tree(cross_cache), tree(tmp_path / "c")
    assert one.keys() == two.keys()
    assert all(one[f] == two[f] for f in one if f != "manifest.json")
    m1, m2 = (read_cache_manifest(f) for f in (cross_cache, tmp_path / "c"))
    ppl1, ppl2 = m1.pop("teacher_ppl"), m2.pop("teacher_ppl")
    assert m1 == m2 and all(ppl2[s] == pytest.approx(ppl1[s], rel=1e-6) for s in ppl1)


def test_offline_cross_ddk_needs_no_teacher_and_resumes_to_the_same_weights(
    tmp_path, cross_cache, student_dir, spans_data, crash_at_step
):
    """No model.teacher at all (the cache stands in for it, perplexities too): two runs give
    the same weights, and a run killed after step 2 resumes to them."""
    finals = []
    for name, crash in (("a", None), ("b", 2)):
        cfg = offline(None, student_dir, spans_data.folder, cross_cache, tmp_path / name,
                      "distill.method=ddk", "trainer.save_every=2")  # fmt: skip
        cfg.model.teacher = None
        if crash is None:
            start_run(cfg)
        else:
            disarm = crash_at_step(crash)
            with pytest.raises(RuntimeError, match="crash"):
                start_run(cfg)
            disarm()
            resume_run(tmp_path / name)
        finals.append(load_file(tmp_path / name / "final" / "model.safetensors"))
        record = json.loads((tmp_path / name / "teacher_ppl.json").read_text())
        assert set(record["source"].values()) == {"teacher cache"}
    a, b = finals
    assert all(torch.equal(a[k], b[k]) for k in a)
