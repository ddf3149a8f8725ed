"""`ddk cache-teacher` and `teacher.mode: offline`: round trip, resume, refusal, reproducibility."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ddk.cli import main
from ddk.commands.cache_teacher import build_cache
from ddk.data.dataset import PreparedData
from ddk.errors import DDKError
from ddk.lock import LOCK_NAME
from ddk.logits import hidden_and_head
from ddk.metrics import read_metrics
from ddk.models import load_teacher
from ddk.preflight import preflight
from ddk.run_dir import resume_run, start_run
from ddk.teacher import Batch, cache_format, sparse_from_logits
from ddk.teacher.cache_format import read_cache_manifest
from ddk.teacher.offline import OfflineTeacher
from ddk.teacher.sampling import sampled_from_logits
from tests.conftest import make_config, one_error_line, tree_digest

# end-to-end runs on the tiny models: outside the fast tier (pytest -m 'not slow')
pytestmark = pytest.mark.slow

K = 8
SAMPLES = 32  # teacher.cache_samples' default
CACHE_RUN = {
    "trainer.max_steps": 12,
    "trainer.micro_batch_size": 4,
    "trainer.lr": 3e-3,
    "trainer.min_lr": 3e-4,
    "trainer.warmup_steps": 2,
    "trainer.log_every": 3,
    "trainer.save_every": 4,
    "trainer.eval_batch_size": 8,
    "distill.K": 5,
}


def config(teacher, student, prepared, cache, *extra, base=CACHE_RUN):
    """A run on `cache` (top-K); `extra`: "section.key=value" overrides."""
    overrides = {"teacher.cache": cache, "teacher.cache_k": K}
    overrides.update(item.split("=", 1) for item in extra)
    return make_config("runs/ddk", teacher, student, prepared, base, **overrides)


def tree(folder: Path) -> dict[str, str]:
    return tree_digest(folder, ignore=(LOCK_NAME,))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, teacher_dir, student_dir, prepared_dir) -> Path:
    folder = tmp_path_factory.mktemp("cache") / "c"
    build_cache(config(teacher_dir, student_dir, prepared_dir, folder), progress=False)
    return folder


def test_manifest_and_bytes_per_token(cache_dir, prepared_dir):
    m = read_cache_manifest(cache_dir)
    data = PreparedData(prepared_dir)
    assert m["complete"] and m["k"] == K and m["dtypes"]["ids"] == "uint16"
    assert m["samples"] == SAMPLES and m["proposal_power"] == 0.5
    assert m["bytes_per_token"] == (K + SAMPLES) * (2 + 2) + 4 + 4
    assert set(m["teacher_ppl"]["val"]) == set(data.names)
    if data.has_split("test"):
        assert set(m["teacher_ppl"]["test"]) == set(data.names)
    for name, info in m["domains"].items():
        assert info["sequences"] == data.domains[name].num_train_sequences
        files = sorted((cache_dir / info["folder"]).glob("*.bin"))
        assert len(files) == info["shards"] >= 1
        total = sum(f.stat().st_size for f in files)
        assert total == info["sequences"] * data.seq_len * m["bytes_per_token"]


def test_round_trip_equals_fresh_teacher(cache_dir, teacher_dir, prepared_dir):
    data = PreparedData(prepared_dir)
    teacher = OfflineTeacher(cache_dir, data.names, torch.device("cpu"))
    model = load_teacher(str(teacher_dir), dtype=torch.float32)
    rows = np.array([[0, 0], [2, 5], [1, cache_format.SHARD_SEQUENCES + 1], [0, 3]])
    rows[2, 1] = min(rows[2, 1], data.domains[data.names[1]].num_train_sequences - 1)
    seqs = torch.cat(
        [data.domains[data.names[d]].sequences("train", [i]) for d, i in rows.tolist()]
    )
    got = teacher.signal(Batch(seqs[:, :-1], rows))
    assert got.sampled and got.sample_ids.shape == (len(rows) * data.seq_len, SAMPLES)
    with torch.no_grad():
        hidden, head = hidden_and_head(model, seqs[:, :-1])
        logits = head(hidden).reshape(-1, head.weight.shape[0])[:, : data.vocab_size]
    ref = sparse_from_logits(logits, K, 1.0)
    torch.testing.assert_close(got.logp, ref.logp, rtol=2e-3, atol=2e-3)  # float16 storage
    torch.testing.assert_close(got.log_tail, ref.log_tail, rtol=2e-3, atol=2e-3)
    # The tail draws are the sampler's, with each position's own uniform.
    manifest = read_cache_manifest(cache_dir)
    u = np.concatenate(
        [cache_format.position_uniforms(manifest, data.names[d], [i]) for d, i in rows.tolist()]
    )
    sampled, _ = sampled_from_logits(
        logits, K, SAMPLES, 1.0, torch.from_numpy(u), logp_dtype=torch.float16
    )
    rows_ok = (got.ids == sampled.ids).all(1)  # away from float16 ties in the head
    assert rows_ok.float().mean() > 0.95
    for a, b in zip(got[3:], sampled[3:]):
        torch.testing.assert_close(a[rows_ok], b[rows_ok], rtol=1e-5, atol=1e-5)
    # Ids agree except where two log-probs tie to within float16 rounding.
    same = got.ids == ref.ids
    assert same.float().mean() > 0.99
    torch.testing.assert_close(
        logits.log_softmax(-1).gather(1, got.ids), ref.logp, rtol=2e-3, atol=2e-3
    )
    # The cached perplexities are the teacher's exact ones.
    from ddk.evaluate import domain_perplexities

    exact = domain_perplexities(model, data, vocab_size=data.vocab_size, batch_size=8)
    cached = read_cache_manifest(cache_dir)["teacher_ppl"]["val"]
    for d in data.names:
        assert cached[d] == pytest.approx(exact[d]["ppl"], rel=1e-6)


def test_interrupted_cache_resumes_to_same_bytes(
    tmp_path, cache_dir, teacher_dir, student_dir, prepared_dir, monkeypatch
):
    folder = tmp_path / "c"
    cfg = config(teacher_dir, student_dir, prepared_dir, folder)
    with pytest.raises(RuntimeError, match="killed"):
        build_cache(cfg, progress=False, write_shard=shard_writer_killed_after(2))
    assert not read_cache_manifest(folder)["complete"]
    assert len(list(folder.rglob("*.bin"))) == 2
    build_cache(cfg, progress=False)
    assert tree(folder) == tree(cache_dir)


def shard_writer_killed_after(shards: int):
    """A `write_shard` that writes `shards` shards, then leaves half of the next one's
    temporary file and raises, as a build killed mid-write would."""
    written = []

    def write(path, arrays):
        if len(written) == shards:
            path.with_name(path.name + ".tmp").write_bytes(b"half a shard")  # as if killed
            raise RuntimeError("killed")
        cache_format.write_shard(path, arrays)
        written.append(path)

    return write


def test_rerun_deletes_only_its_own_temporary_shards(
    tmp_path, cache_dir, teacher_dir, student_dir, prepared_dir
):
    """A killed run's `<shard>.bin.tmp` files go; a user's `notes/draft.tmp` stays."""
    folder = tmp_path / "c"
    shutil.copytree(cache_dir, folder)
    m = read_cache_manifest(folder)
    cache_format.write_cache_manifest(folder, {**m, "complete": False})
    info = next(iter(m["domains"].values()))
    half = cache_format.shard_path(folder, info, 0).with_name("000000.bin.tmp")
    half.write_bytes(b"half a shard")
    (folder / "notes").mkdir()
    (folder / "notes" / "draft.tmp").write_text("mine")
    build_cache(config(teacher_dir, student_dir, prepared_dir, folder), progress=False)
    assert (folder / "notes" / "draft.tmp").read_text() == "mine"
    assert not half.exists() and read_cache_manifest(folder)["complete"]


def test_rerun_rebuilds_a_truncated_or_changed_shard(
    tmp_path, cache_dir, teacher_dir, student_dir, prepared_dir
):
    """A shard cut short, or changed in place (random bytes, log-probs raised to p > 1), is
    refused by a reader in one line and rebuilt by the next `cache-teacher`."""
    folder = tmp_path / "c"
    shutil.copytree(cache_dir, folder)
    m = read_cache_manifest(folder)
    name, info = next(iter(m["domains"].items()))
    cfg = config(teacher_dir, student_dir, prepared_dir, folder)
    first, last = (cache_format.shard_path(folder, info, j) for j in (0, info["shards"] - 1))
    first.write_bytes(np.random.default_rng(0).bytes(first.stat().st_size))
    reader = OfflineTeacher(folder, list(m["domains"]), torch.device("cpu"))
    with pytest.raises(DDKError, match="does not match its checksum"):
        reader.signal(Batch(torch.zeros(1, m["seq_len"], dtype=torch.long), np.array([[0, 0]])))
    last.write_bytes(last.read_bytes()[:-7])
    build_cache(cfg, progress=False)
    assert tree(folder) == tree(cache_dir)


def _without_checksums(cache_dir: Path, folder: Path) -> dict:
    """A copy of `cache_dir` as ddk wrote it before shard checksums: no `shard_sha256`."""
    shutil.copytree(cache_dir, folder)
    m = read_cache_manifest(folder)
    del m[cache_format.CHECKSUMS_KEY]
    cache_format.write_cache_manifest(folder, m)
    return m


def _read_row(folder: Path, m: dict, domain: int) -> None:
    reader = OfflineTeacher(folder, list(m["domains"]), torch.device("cpu"))
    rows = np.array([[domain, 0]])
    reader.signal(Batch(torch.zeros(1, m["seq_len"], dtype=torch.long), rows))


def test_cache_without_checksums_is_checked_and_a_rerun_repairs_it(
    tmp_path, cache_dir, teacher_dir, student_dir, prepared_dir, capsys
):
    """A cache written before shard checksums was read unchecked (log-probs of p > 1 trained
    silently) and a rerun said "nothing to do". Now a reader checks such a shard's values and
    refuses one that cannot be a distribution, and a rerun rebuilds it and records checksums."""
    folder = tmp_path / "c"
    m = _without_checksums(cache_dir, folder)
    names = list(m["domains"])
    _read_row(folder, m, 1)  # an intact shard of an old cache still reads
    edited = cache_format.shard_path(folder, m["domains"][names[0]], 0)
    arrays = [np.array(a) for a in cache_format.open_shard(folder, m, names[0], 0)]
    arrays[1][:] = 5.0  # log-probs raised to +5: p > 1
    cache_format.write_shard(edited, arrays)
    with pytest.raises(DDKError, match="log-probabilities that are NaN or above 0"):
        _read_row(folder, m, 0)
    noise = cache_format.shard_path(folder, m["domains"][names[1]], 0)
    noise.write_bytes(np.random.default_rng(0).bytes(noise.stat().st_size))
    with pytest.raises(DDKError, match="holds token ids beyond the vocabulary|NaN or above 0"):
        _read_row(folder, m, 1)
    cfg = tmp_path / "cfg.yaml"
    offline(teacher_dir, student_dir, prepared_dir, folder, tmp_path / "run").save(cfg)
    assert main(["distill", str(cfg)]) == 2
    captured = capsys.readouterr()
    assert "written before ddk recorded shard checksums" in captured.out
    assert "rerun `ddk cache-teacher`" in one_error_line(captured.err)
    build_cache(config(teacher_dir, student_dir, prepared_dir, folder), progress=False)
    assert "nothing to do" not in capsys.readouterr().out
    assert tree(folder) == tree(cache_dir)  # both shards rebuilt, the checksums recorded


def test_cache_of_another_teacher_in_the_folder_is_refused(
    tmp_path, cache_dir, student_dir, prepared_dir, capsys
):

    folder = tmp_path / "c"
    shutil.copytree(cache_dir, folder)
    before = tree(folder)
    cfg = tmp_path / "cfg.yaml"
    config(student_dir, student_dir, prepared_dir, folder).save(cfg)
    assert main(["cache-teacher", str(cfg)]) == 2
    assert "another teacher" in one_error_line(capsys.readouterr().err)
    assert tree(folder) == before


def offline(teacher, student, prepared, cache, run, *extra):
    return config(
        teacher, student, prepared, cache, "teacher.mode=offline", f"trainer.output_dir={run}",
        *extra,
    )  # fmt: skip


@pytest.mark.parametrize(
    "change, words",
    [
        ("distill.tau=2.0", "tau 1.0"),
        ("model.teacher={student}", "another teacher"),
        ("teacher.cache={tmp}/nothing", "no teacher cache"),
    ],
)
def test_mismatched_cache_refused_before_step_1(
    tmp_path, cache_dir, teacher_dir, student_dir, prepared_dir, capsys, change, words
):
    run = tmp_path / "run"
    change = change.format(student=student_dir, tmp=tmp_path)
    cfg = tmp_path / "cfg.yaml"
    offline(teacher_dir, student_dir, prepared_dir, cache_dir, run, change).save(cfg)
    assert main(["distill", str(cfg)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert words in err, err
    assert not (run / "metrics.jsonl").exists()


def test_cache_of_other_data_refused(
    tmp_path, cache_dir, teacher_dir, student_dir, prepared_dir, capsys
):

    other = tmp_path / "data"
    shutil.copytree(prepared_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["created"] = "another day"
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg = tmp_path / "cfg.yaml"
    offline(teacher_dir, student_dir, other, cache_dir, tmp_path / "run").save(cfg)
    assert main(["distill", str(cfg)]) == 2
    assert "other prepared data" in capsys.readouterr().err


@pytest.fixture(scope="module")
def format1_cache(tmp_path_factory, teacher_dir, student_dir, prepared_dir) -> Path:
    """A top-k cache as ddk wrote it before tail samples (format 1)."""
    folder = tmp_path_factory.mktemp("cache1") / "c"
    cfg = config(teacher_dir, student_dir, prepared_dir, folder, "teacher.sparse_estimator=topk")
    build_cache(cfg, progress=False)
    manifest = read_cache_manifest(folder)
    assert manifest["samples"] == 0 and manifest["bytes_per_token"] == K * (2 + 2) + 4
    for key in ("samples", "proposal_power"):
        del manifest[key]
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    return folder


def test_format1_cache_refused_by_sampled_estimator_and_read_by_topk(
    tmp_path, format1_cache, cache_dir, teacher_dir, student_dir, prepared_dir, capsys
):
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    offline(teacher_dir, student_dir, prepared_dir, format1_cache, run).save(cfg)
    assert main(["distill", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no tail samples" in err[0] and "sparse_estimator=topk" in err[0]
    assert not (run / "metrics.jsonl").exists()
    with pytest.raises(DDKError, match="holds no tail samples"):
        OfflineTeacher(format1_cache, ["a"], torch.device("cpu"), "sampled")

    data = PreparedData(prepared_dir)
    rows = np.array([[0, 1], [1, 0]])
    seqs = torch.cat([data.domains[data.names[d]].sequences("train", [i]) for d, i in rows])
    batch = Batch(seqs[:, :-1], rows)
    old = OfflineTeacher(format1_cache, data.names, torch.device("cpu"), "topk").signal(batch)
    assert not old.sampled and old.ids.shape == (2 * data.seq_len, K)
    # A sampled cache read by the top-k estimator: the same head and tail mass, no samples.
    new = OfflineTeacher(cache_dir, data.names, torch.device("cpu"), "topk").signal(batch)
    assert not new.sampled
    assert torch.equal(new.ids, old.ids) and torch.equal(new.logp, old.logp)
    torch.testing.assert_close(new.log_tail, old.log_tail, rtol=1e-3, atol=1e-3)


def final_weights(run: Path) -> dict:
    return load_file(run / "final" / "model.safetensors")


def test_offline_kd_is_reproducible_and_resumable(
    tmp_path, cache_dir, student_dir, prepared_dir, crash_at_step
):
    # No model.teacher at all: offline training needs only the cache.
    runs = []
    for name in ("a", "b"):
        cfg = offline(
            None, student_dir, prepared_dir, cache_dir, tmp_path / name, "distill.method=kd"
        )
        cfg.model.teacher = None
        runs.append(start_run(cfg))
    a, b = (final_weights(tmp_path / n) for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    kl = [r["kl"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "kl" in r]
    assert kl and all(x > 0 for x in kl)

    cfg = offline(None, student_dir, prepared_dir, cache_dir, tmp_path / "c", "distill.method=kd")
    cfg.model.teacher = None
    disarm = crash_at_step(6)
    with pytest.raises(RuntimeError, match="crash"):
        start_run(cfg)
    disarm()
    resume_run(tmp_path / "c")
    c = final_weights(tmp_path / "c")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_teacher_perplexities_of_older_windows_are_not_used(cache_dir, tmp_path):
    assert OfflineTeacher(cache_dir, ["code"], torch.device("cpu")).perplexities("val")
    old = tmp_path / "old"
    (old / "code").mkdir(parents=True)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    del manifest["teacher_ppl_windows"]  # built by a ddk whose windows crossed documents
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert OfflineTeacher(old, ["code"], torch.device("cpu")).perplexities("val") is None


def test_offline_ddk_uses_cached_teacher_perplexities(
    tmp_path, cache_dir, teacher_dir, student_dir, prepared_dir
):
    cfg = offline(teacher_dir, student_dir, prepared_dir, cache_dir, tmp_path / "run")
    assert start_run(cfg) is not None
    cached = read_cache_manifest(cache_dir)["teacher_ppl"]["val"]
    updates = [
        r
        for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
        if r.get("event") == "domain_update"
    ]
    assert len(updates) == 3  # steps 0, 5, 10
    for d, v in updates[0]["domains"].items():
        assert v["teacher_ppl"] == cached[d]
    record = json.loads((tmp_path / "run" / "teacher_ppl.json").read_text())
    assert set(record["source"].values()) == {"teacher cache"}


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def cache_teacher_on_two_processes(cfg: Path) -> subprocess.CompletedProcess:
    if not os.path.exists(TORCHRUN):
        pytest.skip("torchrun not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "--standalone", "-m", "ddk.cli",
         "cache-teacher", str(cfg)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_two_processes_write_the_same_cache(
    tmp_path, cache_dir, teacher_dir, student_dir, prepared_dir
):
    """Under torchrun/accelerate launch rank r writes shards r::world: same shards, same bytes."""
    cfg = tmp_path / "cfg.yaml"
    config(teacher_dir, student_dir, prepared_dir, tmp_path / "c").save(cfg)
    cache_teacher_on_two_processes(cfg)
    one, two = tree(cache_dir), tree(tmp_path / "c")
    assert one.keys() == two.keys()
    assert all(one[f] == two[f] for f in one if f.endswith(".bin"))
    m1, m2 = (json.loads((f / "manifest.json").read_text()) for f in (cache_dir, tmp_path / "c"))
    p1, p2 = m1.pop("teacher_ppl")["val"], m2.pop("teacher_ppl")["val"]
    # Ranks split the validation batches differently: float32 sums differ in the last bits.
    assert m1 == m2 and p1 == pytest.approx(p2, rel=1e-5)


def test_cache_teacher_honours_a_sharded_teacher_placement(
    tmp_path, cache_dir, teacher_dir, student_dir, prepared_dir
):
    """teacher.placement=sharded: each rank holds half the teacher's layers, so every forward
    is a collective (the rank with fewer shards to write runs throwaway ones); the cache
    equals the one the whole teacher wrote, to float rounding."""
    cfg = tmp_path / "cfg.yaml"
    folder = tmp_path / "c"
    config(teacher_dir, student_dir, prepared_dir, folder, "teacher.placement=sharded").save(cfg)
    done = cache_teacher_on_two_processes(cfg)
    assert "teacher placement: sharded" in done.stdout
    whole, sharded = read_cache_manifest(cache_dir), read_cache_manifest(folder)
    assert sharded["complete"] and sharded["domains"] == whole["domains"]
    for split, ppl in whole["teacher_ppl"].items():
        assert sharded["teacher_ppl"][split] == pytest.approx(ppl, rel=1e-5)
    for name, info in whole["domains"].items():
        for j in range(info["shards"]):
            a = cache_format.open_shard(cache_dir, whole, name, j)
            b = cache_format.open_shard(folder, sharded, name, j)
            assert (a[0] == b[0]).mean() > 0.99  # ids: equal but at float16 near-ties
            np.testing.assert_allclose(b[1], a[1], atol=2e-3)  # log-probs, float16
            np.testing.assert_allclose(b[2], a[2], rtol=1e-4, atol=1e-5)  # log tail


def test_offline_at_full_k_trains_like_online(tmp_path, teacher_dir, student_dir, prepared_dir):
    """A cache with k = vocabulary size is the teacher's whole distribution: the offline run's
    per-step KL and loss match the online run's (to float16 storage), so rows line up."""
    vocab = PreparedData(prepared_dir).vocab_size
    extra = [
        "distill.method=kd",
        "trainer.max_steps=4",
        "trainer.log_every=1",
        f"teacher.cache_k={vocab}",
    ]
    cache = tmp_path / "full"
    build_cache(config(teacher_dir, student_dir, prepared_dir, cache, *extra), progress=False)
    logs = {}
    for mode in ("online", "offline"):
        cfg = config(
            teacher_dir, student_dir, prepared_dir, cache, *extra, f"teacher.mode={mode}",
            f"trainer.output_dir={tmp_path / mode}",
        )  # fmt: skip
        start_run(cfg)
        logs[mode] = [r for r in read_metrics(tmp_path / mode / "metrics.jsonl") if "kl" in r]
    assert len(logs["online"]) == len(logs["offline"]) == 4
    for on, off in zip(logs["online"], logs["offline"]):
        assert off["kl"] == pytest.approx(on["kl"], rel=1e-3)
        assert off["loss"] == pytest.approx(on["loss"], rel=1e-3)


# ---------------------------------------------------------------- cache-teacher as a user runs it
def _k4(teacher, student, prepared, cache, *extra):
    """A top-4 cache config without the run settings (what `ddk cache-teacher` needs)."""
    return config(teacher, student, prepared, cache, "teacher.cache_k=4", *extra, base={})


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_cache_teacher_refuses_a_file(tmp_path, teacher_dir, student_dir, prepared_dir):
    # Before: "cannot create 'afile/.ddk.lock': File exists".
    target = tmp_path / "afile"
    target.write_text("mine\n")
    with pytest.raises(DDKError, match="is a file"):
        build_cache(_k4(teacher_dir, student_dir, prepared_dir, target), progress=False)
    assert target.read_text() == "mine\n"


def test_cache_teacher_refuses_a_folder_of_other_files(
    tmp_path, teacher_dir, student_dir, prepared_dir
):
    # Before: the shards, manifest.json and lock were written next to the user's files.
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep\n")
    with pytest.raises(DDKError, match="non-empty folder that holds no teacher cache"):
        build_cache(_k4(teacher_dir, student_dir, prepared_dir, target), progress=False)
    assert _listing(target) == ["notes.txt"]


def test_cache_teacher_refuses_prepared_data_untouched(teacher_dir, student_dir, prepared_dir):
    # Before: refused as "a cache of another teacher..." but only after leaving a lock file in
    # the prepared folder.
    before = _listing(prepared_dir)
    with pytest.raises(DDKError, match=r"not a teacher cache \(it is prepared data\)"):
        build_cache(_k4(teacher_dir, student_dir, prepared_dir, prepared_dir), progress=False)
    assert _listing(prepared_dir) == before
    assert LOCK_NAME not in before


def test_cache_teacher_accepts_an_empty_folder_or_one_left_by_a_kill(tmp_path, prepared_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    cache_format.check_target(empty)
    killed = tmp_path / "killed"  # killed between taking the lock and the first manifest
    killed.mkdir()
    (killed / LOCK_NAME).write_text("")
    (killed / "manifest.json.tmp").write_text("{")
    cache_format.check_target(killed)


def test_offline_run_on_prepared_data_as_cache_says_so(
    tmp_path, teacher_dir, student_dir, prepared_dir
):
    # Before: "... has cache format 2; build it again", which sends the user the wrong way.
    cfg = _k4(
        teacher_dir,
        student_dir,
        prepared_dir,
        prepared_dir,
        "teacher.mode=offline",
        f"trainer.output_dir={tmp_path / 'run'}",
    )
    with pytest.raises(DDKError, match=r"not a teacher cache \(it is prepared data\)"):
        preflight(cfg)
    assert not (tmp_path / "run").exists()


def test_offline_run_needs_no_teacher_on_this_machine(
    tmp_path, teacher_dir, student_dir, prepared_dir, capsys
):
    # Before: a run.yaml naming a teacher that only the caching machine holds was refused
    # ("cannot load ...; its weights must be on disk to fingerprint the cache"), although an
    # offline run never loads it. Now the cache is matched by the teacher's name.

    away = tmp_path / "teacher-elsewhere"
    shutil.copytree(teacher_dir, away)
    cache = tmp_path / "cache"
    build_cache(_k4(away, student_dir, prepared_dir, cache), progress=False)
    shutil.rmtree(away)
    run = [f"trainer.output_dir={tmp_path / 'run'}", "teacher.mode=offline"]
    preflight(_k4(away, student_dir, prepared_dir, cache, *run))
    assert "is not on this machine" in capsys.readouterr().out
    with pytest.raises(DDKError, match="built by another teacher"):
        preflight(_k4(tmp_path / "other-teacher", student_dir, prepared_dir, cache, *run))
    # A teacher that is on disk is still fingerprinted: same name, other weights, refused.
    shutil.copytree(teacher_dir, away)
    (away / "config.json").write_text((away / "config.json").read_text() + " ")
    with pytest.raises(DDKError, match="built by another teacher"):
        preflight(_k4(away, student_dir, prepared_dir, cache, *run))


def test_offline_run_says_when_the_cache_has_another_k(
    tmp_path, teacher_dir, student_dir, prepared_dir, capsys
):
    # Before: teacher.cache_k=32 against a top-4 cache trained with k = 4 without a word.
    cache = tmp_path / "cache"
    build_cache(_k4(teacher_dir, student_dir, prepared_dir, cache), progress=False)
    run = [f"trainer.output_dir={tmp_path / 'run'}", "teacher.mode=offline"]
    preflight(_k4(teacher_dir, student_dir, prepared_dir, cache, *run))
    assert "warning" not in capsys.readouterr().out
    preflight(_k4(teacher_dir, student_dir, prepared_dir, cache, *run, "teacher.cache_k=32"))
    assert "holds the teacher's top-4, not teacher.cache_k=32" in capsys.readouterr().out


def test_sigterm_stops_cache_teacher_with_a_resume_hint(
    tmp_path, teacher_dir, student_dir, prepared_dir, monkeypatch, capsys
):
    # Before: SIGTERM (preemption) killed `ddk cache-teacher` silently with exit 143.
    import signal

    from ddk.cli import main

    config = {
        "model": {"teacher": str(teacher_dir), "student": str(student_dir)},
        "data": {"prepared": str(prepared_dir)},
        "teacher": {"cache": str(tmp_path / "cache"), "cache_k": 4},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    original, written = cache_format.write_shard, []

    def term_after_one(path, arrays):
        original(path, arrays)
        written.append(path)
        if len(written) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cache_format, "write_shard", term_after_one)  # the public seam
    before = signal.getsignal(signal.SIGTERM)
    assert main(["cache-teacher", str(tmp_path / "run.yaml")]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    assert len(list((tmp_path / "cache").rglob("*.bin"))) == 1
    monkeypatch.setattr(cache_format, "write_shard", original)
    assert main(["cache-teacher", str(tmp_path / "run.yaml")]) == 0


def test_rerun_on_a_finished_cache_is_a_no_op(
    tmp_path, teacher_dir, student_dir, prepared_dir, capsys
):
    # Before: a rerun loaded the teacher, recomputed every perplexity and marked the cache
    # incomplete meanwhile (so an offline run starting then was refused).
    cache = tmp_path / "cache"
    cfg = _k4(teacher_dir, student_dir, prepared_dir, cache)
    build_cache(cfg, progress=False)
    manifest = cache / "manifest.json"
    stamp = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    capsys.readouterr()
    build_cache(cfg, progress=False)
    assert "already holds this cache; nothing to do" in capsys.readouterr().out
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == stamp
    # A missing shard is not "finished": the rerun writes it again.
    shard = sorted(cache.rglob("*.bin"))[0]
    data = shard.read_bytes()
    shard.unlink()
    build_cache(cfg, progress=False)
    assert "nothing to do" not in capsys.readouterr().out
    assert shard.read_bytes() == data


def test_eval_on_a_cache_says_it_is_a_teacher_cache(cache_dir, student_dir, capsys):
    assert main(["eval", "--model", str(student_dir), "--data", str(cache_dir)]) == 2
    assert "is a teacher cache" in one_error_line(capsys.readouterr().err)


def test_refused_cache_teacher_leaves_no_folder(tmp_path, teacher_dir, student_dir, prepared_dir):
    folder = tmp_path / "new" / "c"
    cfg = config(teacher_dir, student_dir, prepared_dir, folder, "teacher.cache_k=1000000")
    with pytest.raises(DDKError, match="exceeds the vocabulary"):
        build_cache(cfg, progress=False)
    assert not folder.exists()


def _edit(m: dict, change: str, folder: Path) -> dict:
    name = next(iter(m["domains"]))
    if change == "missing key":
        del m["seq_len"]
    elif change == "wrong type":
        m["domains"][name]["shards"] = "6"
    elif change == "outside":
        m["domains"][name]["folder"] = "../outside"
    elif change == "file for folder":
        target = folder / m["domains"][name]["folder"]
        shutil.rmtree(target)
        target.write_text("not a folder")
    return m


@pytest.mark.parametrize(
    "change, words",
    [
        ("missing key", "key 'seq_len' is missing"),
        ("wrong type", "has the wrong type"),
        ("outside", "not inside the cache"),
        ("file for folder", "is a file, not a shard folder"),
        ("not json", "corrupt (not JSON); delete"),
    ],
)
def test_bad_cache_manifest_is_one_line_that_a_rerun_can_act_on(
    tmp_path, cache_dir, teacher_dir, student_dir, prepared_dir, change, words
):
    folder = tmp_path / "c"
    shutil.copytree(cache_dir, folder)
    manifest = folder / cache_format.MANIFEST
    if change == "not json":
        manifest.write_text("{not json")
    else:
        manifest.write_text(json.dumps(_edit(json.loads(manifest.read_text()), change, folder)))
    with pytest.raises(DDKError, match="delete") as e:
        build_cache(config(teacher_dir, student_dir, prepared_dir, folder), progress=False)
    assert words in str(e.value)


def test_cache_inside_prepared_data_is_refused(tmp_path, teacher_dir, student_dir, prepared_dir):
    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    before = tree_digest(data)
    cfg = config(teacher_dir, student_dir, data, data / "cache")
    with pytest.raises(DDKError, match="inside the prepared data"):
        build_cache(cfg, progress=False)
    assert tree_digest(data) == before


def test_disk_full_during_cache_teacher_is_one_line_and_leaves_no_temporary(
    tmp_path, mount_tmpfs, teacher_dir, student_dir, prepared_dir, cache_dir
):
    shard = max(p.stat().st_size for p in cache_dir.rglob("*.bin"))
    disk = mount_tmpfs(tmp_path / "disk", f"size={shard * 3 // 2 // 1024}k")  # one shard, not two
    folder = disk / "c"
    with pytest.raises(DDKError, match="the disk is full"):
        build_cache(config(teacher_dir, student_dir, prepared_dir, folder), progress=False)
    assert not list(folder.rglob("*.tmp")) and len(list(folder.rglob("*.bin"))) >= 1


def test_cache_teacher_runs_distills_preflight(
    tmp_path, save_model, tokenizer_dir, student_dir, prepared_dir
):
    """A cache for data the teacher cannot serve (here: seq_len beyond its context) is
    refused before any teacher forward, as distill would refuse it."""
    short = save_model(tmp_path / "short", tokenizer_dir, hidden_size=48, max_positions=16)
    folder = tmp_path / "c"
    with pytest.raises(DDKError, match="exceeds the teacher's context of 16"):
        build_cache(config(short, student_dir, prepared_dir, folder), progress=False)
    assert not folder.exists()


def test_resume_refuses_a_rebuilt_cache(
    tmp_path, cache_dir, teacher_dir, student_dir, prepared_dir, crash_at_step
):
    """A checkpoint pins the cache it trained on: the same path rebuilt with another k is
    refused on --resume, not trained on with a warning."""
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    cfg = offline(teacher_dir, student_dir, prepared_dir, cache, tmp_path / "run")
    disarm = crash_at_step(6)
    with pytest.raises(RuntimeError, match="crash"):
        start_run(cfg)
    disarm()
    shutil.rmtree(cache)
    build_cache(config(teacher_dir, student_dir, prepared_dir, cache, "teacher.cache_k=4"))
    with pytest.raises(DDKError, match="teacher cache .* changed since"):
        resume_run(tmp_path / "run")
