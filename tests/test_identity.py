"""What makes prepared data and a teacher "the same" (`ddk.identity`), and that every cache
built on them notices when they change."""

import shutil
from pathlib import Path

import pytest

from ddk.commands.cache_teacher import build_cache
from ddk.data.dataset import PreparedData
from ddk.identity import Strength, data_fingerprint
from ddk.runtime import LocalRuntime
from ddk.teacher.offline import cache_problems
from ddk.teacher.perplexity import HELDOUT, SharedPerplexities
from tests.conftest import make_config, with_test_split


def test_cache_keys_follow_weights_dtype_and_data(tmp_path, teacher_dir, student_dir, prepared_dir):
    from ddk.identity import Strength
    from ddk.identity import data_fingerprint as fingerprint
    from ddk.identity import evaluated_teacher_fingerprint as teacher_fingerprint
    from ddk.teacher.perplexity import HELDOUT, TeacherPPLCache

    def data_fingerprint(folder):  # the perplexity cache's key: the held-out tokens
        return fingerprint(folder, Strength.CONTENT, splits=HELDOUT)

    store = tmp_path / "store"
    fp = teacher_fingerprint(str(teacher_dir), "torch.float32", store)
    assert fp == teacher_fingerprint(str(teacher_dir), "torch.float32", store)  # memoised
    assert fp != teacher_fingerprint(str(teacher_dir), "torch.bfloat16", store)
    assert fp != teacher_fingerprint(str(student_dir), "torch.float32", store)
    copy = shutil.copytree(teacher_dir, tmp_path / "teacher_copy")
    assert teacher_fingerprint(str(copy), "torch.float32", store) == fp  # content, not path
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")  # one byte of the weights
    assert teacher_fingerprint(str(copy), "torch.float32", store) != fp
    other_data = with_test_split(prepared_dir, tmp_path / "data")
    assert data_fingerprint(other_data) != data_fingerprint(prepared_dir)
    cache = TeacherPPLCache(store, data_fingerprint(prepared_dir), fp)
    cache.put("val", {"a": {"ppl": 2.0}, "b": {"ppl": 3.0}})
    assert cache.get("val", ["b"]) == {"b": {"ppl": 3.0}}
    assert cache.get("val", ["a", "c"]) is None and cache.get("test", ["a"]) is None
    other = TeacherPPLCache(store, data_fingerprint(other_data), fp)
    assert other.get("val", ["a"]) is None


def test_each_strength_sees_what_its_docstring_says(tmp_path, prepared_dir):
    same = shutil.copytree(prepared_dir, tmp_path / "same")  # a copy keeping modification times
    moved = shutil.copytree(prepared_dir, tmp_path / "moved", copy_function=shutil.copy)
    fp = {s: data_fingerprint(same, s) for s in Strength}
    # A copy that resets modification times: only FILES (stat) reads it as other data.
    assert data_fingerprint(moved, Strength.RECORD) == fp[Strength.RECORD]
    assert data_fingerprint(moved, Strength.CONTENT) == fp[Strength.CONTENT]
    assert data_fingerprint(moved, Strength.FILES) != fp[Strength.FILES]
    # One token edited in place: RECORD (the manifest) is blind to it, FILES and CONTENT see it.
    _flip_first_token(same / "code" / "train.bin")
    assert data_fingerprint(same, Strength.RECORD) == fp[Strength.RECORD]
    assert data_fingerprint(same, Strength.FILES) != fp[Strength.FILES]
    assert data_fingerprint(same, Strength.CONTENT) != fp[Strength.CONTENT]
    # CONTENT of the held-out splits only: a training shard is not part of it.
    held_out = data_fingerprint(moved, Strength.CONTENT, splits=HELDOUT)
    _flip_first_token(moved / "code" / "train.bin")
    assert data_fingerprint(moved, Strength.CONTENT, splits=HELDOUT) == held_out


def _flip_first_token(path: Path) -> None:
    tokens = bytearray(path.read_bytes())
    tokens[0] ^= 1  # same size, same manifest
    path.write_bytes(bytes(tokens))


@pytest.mark.parametrize("shard", ["train.bin", "val.bin"])
def test_a_shard_edited_in_place_invalidates_every_cache_that_depends_on_it(
    shard, tmp_path, teacher_dir, student_dir, prepared_dir
):
    """--resume (checkpoints record the data's FILES), the top-k cache (its manifest records
    the CONTENT of every split) and the teacher-perplexity cache (keyed by the held-out
    splits' CONTENT) all notice one token changed in place; a training shard does not touch
    the perplexity cache, which does not depend on it."""
    data_dir = shutil.copytree(prepared_dir, tmp_path / "data")
    cfg = make_config(
        tmp_path / "run",
        teacher_dir,
        student_dir,
        data_dir,
        **{
            "teacher.mode": "offline",
            "teacher.cache": tmp_path / "cache",
            "teacher.cache_k": 4,
            "teacher.ppl_cache_dir": tmp_path / "ppl",
        },
    )
    build_cache(cfg, progress=False, runtime=LocalRuntime())  # a one-process runtime
    data = PreparedData(data_dir)

    def ppl_cache_key():
        shared = SharedPerplexities(
            cfg, data, LocalRuntime(), student_rows=data.vocab_size, splits=("val",)
        )
        return shared.key

    resume_key, ppl_key = data_fingerprint(data_dir), ppl_cache_key()
    assert cache_problems(cfg, data.manifest, data.names) == []
    _flip_first_token(data_dir / "code" / shard)
    assert data_fingerprint(data_dir) != resume_key  # `ddk distill --resume` refuses
    problems = cache_problems(cfg, data.manifest, data.names)
    assert len(problems) == 1 and "its token files changed" in problems[0], problems
    assert (ppl_cache_key() != ppl_key) == (shard == "val.bin")
