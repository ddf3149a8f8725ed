"""The prepared-data contract: one typed reader and writer; a bad manifest is one line, exit 2."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from ddk.cli import main
from ddk.data.dataset import PreparedData
from ddk.data.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TEXT_FORMAT_VERSION,
    read_manifest,
    read_owner,
)
from ddk.errors import DDKError
from ddk.lock import LOCK_NAME
from ddk.losses import IGNORE_INDEX
from ddk.ownership import check_replaceable, list_files
from tests.conftest import one_error_line


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(folder: Path, fn) -> None:
    path = folder / MANIFEST
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_reader_is_typed_and_owner_lists_every_file(prepared_dir, tmp_path):
    m = read_manifest(prepared_dir)
    # raw text is still written as format 3 (an older ddk reads it); chat data is format 4
    assert m.format == FORMAT and m.format_version == TEXT_FORMAT_VERSION == 3
    assert FORMAT_VERSION == 4
    assert m.seq_len == 32 and m.val_sequences == 4 and m.test_sequences == 4
    assert m.add_bos is False  # the test tokenizer (GPT-2 style) adds no BOS
    assert m.has_split("test")
    assert all(d.test_sequences == 4 and d.duplicates_dropped >= 0 for d in m.domains.values())
    owner = read_owner(prepared_dir)
    assert owner["kind"] == "prepared"
    on_disk = [f for f in list_files(prepared_dir) if f != LOCK_NAME]
    assert owner["files"] == on_disk
    assert {"manifest.json", "code/test.bin", "code/heldout_hashes.npy"} <= set(on_disk)
    # what `--overwrite` decides by: ddk's own folder may be replaced, a user's file may not
    data = copy_data(prepared_dir, tmp_path / "data")
    check_replaceable(data, read_owner(data), "prepared", "output")
    (data / "notes.txt").write_text("mine")
    with pytest.raises(DDKError, match="notes.txt"):
        check_replaceable(data, read_owner(data), "prepared", "output")


BAD_MANIFESTS = [
    ("missing key", lambda m: m.pop("seq_len"), ["key 'seq_len' is missing"]),
    (
        "missing domain key",
        lambda m: m["domains"]["code"].pop("train_tokens"),
        ["key 'domains.code.train_tokens' is missing"],
    ),
    (
        "missing test split key",
        lambda m: m["domains"]["math"].pop("test_tokens"),
        ["key 'domains.math.test_tokens' is missing"],
    ),
    (
        "missing format 3 key",
        lambda m: m["domains"]["prose"].pop("heldout_unused_tokens"),
        ["key 'domains.prose.heldout_unused_tokens' is missing"],
    ),
    ("wrong type", lambda m: m.update(seq_len="32"), ["key 'seq_len' is invalid"]),
    (
        "wrong nested type",
        lambda m: m["tokenizer"].update(vocab_size=3.5),
        ["key 'tokenizer.vocab_size' is invalid"],
    ),
    ("domains not a dict", lambda m: m.update(domains=["code"]), ["key 'domains' is invalid"]),
    (
        "dotdot folder",
        lambda m: m["domains"]["code"].update(folder="../elsewhere"),
        ["key 'domains.code.folder'", "'..'"],
    ),
    (
        "absolute folder",
        lambda m: m["domains"]["code"].update(folder="/etc"),
        ["key 'domains.code.folder'", "absolute"],
    ),
    ("newer format", lambda m: m.update(format_version=99), ["newer than this ddk reads"]),
]


def _bad_folders(prepared_dir: Path, root: Path) -> list[tuple[str, Path, list[str]]]:
    cases = []
    for name, fn, words in BAD_MANIFESTS:
        folder = copy_data(prepared_dir, root / name.replace(" ", "_"))
        edit_manifest(folder, fn)
        cases.append((name, folder, words))
    corrupt = copy_data(prepared_dir, root / "corrupt")
    (corrupt / MANIFEST).write_text('{"format_version": 2, "domains": ')
    cases.append(("corrupt JSON", corrupt, ["is corrupt (not JSON)"]))
    not_object = copy_data(prepared_dir, root / "not_object")
    (not_object / MANIFEST).write_text("[1, 2]")
    cases.append(("not an object", not_object, ["not a JSON object"]))
    return cases


@pytest.fixture(scope="module")
def bad_folders(prepared_dir, tmp_path_factory):
    return _bad_folders(prepared_dir, tmp_path_factory.mktemp("bad_manifests"))


def test_bad_manifest_is_one_line_naming_the_key(bad_folders):
    for name, folder, words in bad_folders:
        with pytest.raises(DDKError) as err:
            read_manifest(folder)
        msg = str(err.value)
        assert "\n" not in msg, name
        for w in words:
            assert w in msg, f"{name}: {msg!r} lacks {w!r}"


def test_bad_manifest_exits_2_for_eval_and_distill(
    bad_folders, student_dir, teacher_dir, tmp_path, capsys
):
    for name, folder, words in bad_folders:
        capsys.readouterr()
        assert main(["eval", "--model", str(student_dir), "--data", str(folder)]) == 2, name
        line = one_error_line(capsys.readouterr().err)
        assert all(w in line for w in words), f"eval, {name}: {line!r}"

        config = tmp_path / f"{folder.name}.yaml"
        run_dir = tmp_path / f"run_{folder.name}"
        data = {
            "model": {"teacher": str(teacher_dir), "student": str(student_dir)},
            "data": {"prepared": str(folder)},
            "trainer": {"output_dir": str(run_dir), "max_steps": 2},
        }
        config.write_text(yaml.safe_dump(data))
        assert main(["distill", str(config)]) == 2, name
        line = one_error_line(capsys.readouterr().err)
        assert "data.prepared" in line and all(w in line for w in words), f"distill, {name}"
        assert not run_dir.exists() or not any(run_dir.iterdir())


def test_data_without_a_test_split_still_reads(prepared_dir, tmp_path):
    """Data prepared by format 1 (no test split): readable; callers can ask and fall back."""
    old = copy_data(prepared_dir, tmp_path / "old")

    def to_format_1(m):
        for key in ("format", "owner", "test_sequences", "add_bos"):
            m.pop(key)
        m["format_version"] = 1
        for d in m["domains"].values():
            for key in ("test_documents", "test_tokens", "test_sequences", "duplicates_dropped"):
                d.pop(key)

    edit_manifest(old, to_format_1)
    for d in ("code", "prose", "math"):
        (old / d / "test.bin").unlink()
    data = PreparedData(old)
    assert not data.has_split("test") and data.has_split("val")
    shard = data.domains["code"]
    assert shard.num_sequences("val") == 4
    inputs, labels = shard.heldout_batch("val", [0])
    assert inputs.shape == labels.shape and inputs.shape[1] <= 32
    with pytest.raises(DDKError, match="no test split"):
        shard.num_sequences("test")
    assert PreparedData(prepared_dir).has_split("test")


def _as_format_2(prepared_dir: Path, old: Path) -> Path:
    """`prepared_dir` as ddk format 2 wrote it: each held-out document cut to its first seq_len
    tokens (no EOS when longer), no format 3 keys."""
    copy_data(prepared_dir, old)
    m = json.loads((old / MANIFEST).read_text())
    L = m["seq_len"]
    for d in m["domains"].values():
        for split in ("val", "test"):
            folder = old / d["folder"]
            tokens = np.fromfile(folder / f"{split}.bin", dtype=np.uint16)
            docs = np.load(folder / f"{split}_docs.npy")
            starts = np.concatenate([[0], np.cumsum(docs[:, 1])[:-1]])
            cut = np.minimum(docs[:, 1], L)
            np.concatenate([tokens[s : s + n] for s, n in zip(starts, cut)]).tofile(
                folder / f"{split}.bin"
            )
            np.save(folder / f"{split}_docs.npy", np.stack([docs[:, 0], cut], axis=1))
            d[f"{split}_tokens"] = int(cut.sum())
            d[f"{split}_sequences"] = int((cut.sum() - 1) // L)  # packed windows, as then
        for key in ("total_tokens", "heldout_unused_tokens", "duplicate_tokens"):
            d.pop(key)
    m.pop("heldout_windows_per_document")
    m["format_version"] = 2
    (old / MANIFEST).write_text(json.dumps(m))
    return old


def test_format_2_data_reads_one_document_per_window_and_warns(prepared_dir, tmp_path, capsys):
    old = _as_format_2(prepared_dir, tmp_path / "old")
    data = PreparedData(old)
    err = capsys.readouterr().err
    assert "format 2" in err and "prepare it again" in err.lower()
    for name, shard in data.domains.items():
        folder = old / name
        tokens = np.fromfile(folder / "val.bin", dtype=np.uint16)
        docs = np.load(folder / "val_docs.npy")
        assert shard.num_sequences("val") == len(docs)  # one window per (cut) document
        inputs, labels = shard.heldout_batch("val", range(len(docs)))
        pos = 0
        for row, n in enumerate(docs[:, 1].tolist()):
            assert labels[row, : n - 1].tolist() == tokens[pos + 1 : pos + n].tolist()
            assert (labels[row, n - 1 :] == IGNORE_INDEX).all()  # never the next document
            pos += n
    PreparedData(prepared_dir)
    assert "older ddk" not in capsys.readouterr().err


def test_held_out_docs_that_disagree_with_the_manifest_are_one_line(prepared_dir, tmp_path):
    data_dir = copy_data(prepared_dir, tmp_path / "data")
    docs = np.load(data_dir / "code" / "val_docs.npy")
    docs[0, 1] += 1
    np.save(data_dir / "code" / "val_docs.npy", docs)
    with pytest.raises(DDKError, match="val_docs.npy' does not match the manifest"):
        PreparedData(data_dir).domains["code"].num_sequences("val")
    np.save(data_dir / "code" / "val_docs.npy", docs.astype(np.float32))
    with pytest.raises(DDKError, match="float32 values .* not int64"):
        PreparedData(data_dir).domains["code"].num_sequences("val")


def _data_with_a_link(tmp_path: Path, prepared_dir: Path, link_file: bool) -> tuple[Path, Path]:
    """A copy of prepared data whose first domain folder (or its val.bin) is a link to a copy
    outside the data folder. Returns (data, outside)."""
    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    folder = next(iter(json.loads((data / "manifest.json").read_text())["domains"].values()))
    inside = data / folder["folder"]
    outside = tmp_path / "elsewhere"
    if link_file:
        outside.mkdir()
        (inside / "val.bin").rename(outside / "val.bin")
        (inside / "val.bin").symlink_to(outside / "val.bin")
    else:
        inside.rename(outside)
        inside.symlink_to(outside)
    return data, outside


@pytest.mark.parametrize("link_file", [False, True], ids=["domain folder", "val.bin"])
def test_prepared_data_links_out_of_the_folder_are_refused(
    tmp_path, prepared_dir, student_dir, link_file, capsys
):
    # Before: the manifest's folder names were confined, but a link under them was followed.
    data, outside = _data_with_a_link(tmp_path, prepared_dir, link_file)
    with pytest.raises(DDKError, match="outside the prepared data folder"):
        PreparedData(data)
    assert main(["eval", "--model", str(student_dir), "--data", str(data)]) == 2
    assert str(outside) in one_error_line(capsys.readouterr().err)


def test_prepared_data_links_inside_the_folder_still_work(tmp_path, prepared_dir):
    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    name, info = next(iter(json.loads((data / "manifest.json").read_text())["domains"].items()))
    (data / info["folder"]).rename(data / "moved")
    (data / info["folder"]).symlink_to("moved")
    assert PreparedData(data).domains[name].num_val_sequences > 0
    link = tmp_path / "data_link"  # the data folder itself may be a link
    link.symlink_to(data)
    assert PreparedData(link).domains[name].num_val_sequences > 0
