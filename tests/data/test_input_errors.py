"""`ddk prepare` on bad inputs and outputs: one line, exit 2, and no file but ddk's own changed."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from ddk.cli import main
from ddk.config import PrepareSection
from ddk.data import longdocs
from ddk.data.longdocs import encode_documents, split_at_whitespace
from ddk.data.prepare import prepare
from ddk.errors import DDKError
from ddk.lock import FolderLock
from tests.conftest import one_error_line, tree_digest

WORDS = [
    "the",
    "model",
    "learns",
    "data",
    "from",
    "text",
    "and",
    "code",
    "with",
    "small",
    "steps",
    "over",
    "many",
    "domains",
]


def _docs(domain: str, n: int) -> list[str]:
    rng = random.Random(domain)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(n)]


def _write_corpus(root: Path, sizes: dict[str, int]) -> Path:
    """One sub-folder per domain: six .txt documents, the rest in a JSONL file."""
    for domain, n in sizes.items():
        folder = root / domain
        folder.mkdir(parents=True)
        docs = _docs(domain, n)
        for i, t in enumerate(docs[:6]):
            (folder / f"doc{i:03d}.txt").write_text(t)
        with open(folder / "part0.jsonl", "w") as fh:
            for t in docs[6:]:
                fh.write(json.dumps({"text": t}) + "\n")
    return root


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def _argv(work: Path, tokenizer_dir: Path, out: Path | None = None) -> list[str]:
    return [
        "prepare",
        "--input",
        str(work / "corpus"),
        "--output",
        str(out or work / "out"),
        "--tokenizer",
        str(tokenizer_dir),
        "--seq-len",
        "16",
        "--val-sequences",
        "2",
    ]


# Each case changes a fresh work folder (corpus/ with domains code and prose) and returns extra
# CLI args, words the error must hold, and words it must not.
def _user_folder_with_manifest(work, tok):
    out = work / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"domains": {}, "name": "my project"}))
    (out / "main.py").write_text("print('mine')\n")
    return ["--overwrite"], ["did not write", "choose another folder"], ["--overwrite"]


def _prepared_plus_user_file(work, tok):
    cfg = PrepareSection(
        input=str(work / "corpus"), output=str(work / "out"), seq_len=32, val_sequences=2
    )
    prepare(cfg, str(tok), progress=False)
    (work / "out" / "notes.md").write_text("my notes")
    return ["--overwrite"], ["1 file(s) ddk did not write (notes.md)"], ["--overwrite"]


def _corrupt_manifest(work, tok):
    (work / "out").mkdir()
    (work / "out" / "manifest.json").write_text('{"format_version": 1, "dom')
    return ["--overwrite"], ["did not write"], ["--overwrite"]


def _older_ddk_folder(work, tok):
    (work / "out" / "code").mkdir(parents=True)
    (work / "out" / "code" / "train.bin").write_bytes(b"\0\1")
    (work / "out" / "manifest.json").write_text(json.dumps({"format_version": 1, "domains": {}}))
    return ["--overwrite"], ["older ddk", "delete it yourself"], ["--overwrite"]


def _different_corpus(work, tok):
    cfg = PrepareSection(
        input=str(work / "corpus"), output=str(work / "out"), seq_len=32, val_sequences=2
    )
    prepare(cfg, str(tok), progress=False)
    return [], ["different prepared corpus", "--overwrite"], []  # here --overwrite helps


def _txt_latin1(work, tok):
    (work / "corpus" / "prose" / "old.txt").write_bytes("un café au lait ".encode("latin-1") * 9)
    return [], ["old.txt", "not UTF-8", "offset 6", "convert"], []


def _txt_utf16(work, tok):
    (work / "corpus" / "code" / "wide.txt").write_bytes("def f(): pass\n".encode("utf-16"))
    return [], ["wide.txt", "UTF-16", "convert it"], []


def _jsonl_bad_byte(work, tok):
    lines = [json.dumps({"text": "fine text"}).encode()] * 3 + [b'{"text": "caf\xe9"}']
    (work / "corpus" / "prose" / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    offset = 3 * (len(lines[0]) + 1) + len(b'{"text": "caf')
    return [], ["bad.jsonl line 4", f"offset {offset}", "not UTF-8"], []


def _jsonl_utf16(work, tok):
    data = (json.dumps({"text": "hello"}) + "\n").encode("utf-16")
    (work / "corpus" / "prose" / "wide.jsonl").write_bytes(data)
    return [], ["wide.jsonl", "UTF-16"], []


def _json_array_bad_byte(work, tok):
    data = b'[\n {"text": "one"},\n {"text": "tw\xff"}\n]\n'
    (work / "corpus" / "code" / "items.json").write_bytes(data)
    return [], ["items.json line 3", "not UTF-8"], []


def _parquet_int_column(work, tok):
    pq.write_table(pa.table({"text": [1, 2, 3]}), work / "corpus" / "code" / "n.parquet")
    return [], ["n.parquet", "column 'text' holds int64, not strings"], []


def _dataset_int_column(work, tok):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": list(range(10)), "domain": ["x"] * 10})
    ds.save_to_disk(str(work / "ds"))
    return ["--input", str(work / "ds")], ["column 'text' holds int64, not strings"], []


def _empty_domain(work, tok):
    (work / "corpus" / "empty").mkdir()
    (work / "corpus" / "empty" / "nothing.txt").write_text("")
    return [], ["domain 'empty' has no documents", "stops"], []


def _parent_is_a_file(work, tok):
    (work / "notes.txt").write_text("mine")
    return ["--output", str(work / "notes.txt" / "sub" / "out")], ["cannot create", "notes.txt"], []


def _output_locked(work, tok):
    _HELD.append(FolderLock(work / "out", "prepare", path=work / ".out.ddk.lock").acquire())
    return [], [f"PID {os.getpid()}", "in use by another ddk process"], []


def _identical_documents(work, tok):
    _write_jsonl(work / "corpus" / "copies" / "a.jsonl", ["the same text, again and again."] * 40)
    return [], ["domain 'copies'", "40 documents", "1 distinct text", "duplicates"], ["too little"]


def _labelled(work, tok) -> Path:
    """Prepared data of the corpus, for --exclude-heldout to read."""
    out = work / "labelled"
    cfg = PrepareSection(input=str(work / "corpus"), output=str(out), seq_len=16, val_sequences=2)
    prepare(cfg, str(tok), progress=False)
    return out


def _heldout_hashes_float(work, tok):
    path = _labelled(work, tok) / "code" / "heldout_hashes.npy"
    np.save(path, np.load(path).astype(np.float64))
    return (
        ["--exclude-heldout", str(work / "labelled")],
        ["code/heldout_hashes.npy", "float64", "uint64", "prepare"],
        [],
    )


def _heldout_hashes_pickled(work, tok):
    path = _labelled(work, tok) / "code" / "heldout_hashes.npy"
    np.save(path, np.array([{"hash": 1}], dtype=object), allow_pickle=True)
    return ["--exclude-heldout", str(work / "labelled")], ["code/heldout_hashes.npy", "prepare"], []


def _heldout_hashes_garbage(work, tok):
    path = _labelled(work, tok) / "code" / "heldout_hashes.npy"
    path.write_bytes(bytes(range(256)) * 4)
    return ["--exclude-heldout", str(work / "labelled")], ["code/heldout_hashes.npy", "prepare"], []


def _heldout_hashes_link_out(work, tok):
    path = _labelled(work, tok) / "code" / "heldout_hashes.npy"
    outside = work / "elsewhere.npy"
    np.save(outside, np.load(path))
    path.unlink()
    path.symlink_to(outside)
    return (
        ["--exclude-heldout", str(work / "labelled")],
        ["heldout_hashes.npy", "outside the prepared data folder"],
        [],
    )


_HELD: list[FolderLock] = []

CASES = {
    "overwrite a user folder with a manifest": _user_folder_with_manifest,
    "overwrite prepared data plus a user file": _prepared_plus_user_file,
    "overwrite a folder with a corrupt manifest": _corrupt_manifest,
    "overwrite data of an older ddk": _older_ddk_folder,
    "a different corpus without --overwrite": _different_corpus,
    "txt in Latin-1": _txt_latin1,
    "txt in UTF-16": _txt_utf16,
    "jsonl with a bad byte": _jsonl_bad_byte,
    "jsonl in UTF-16": _jsonl_utf16,
    "json array with a bad byte": _json_array_bad_byte,
    "parquet text column of ints": _parquet_int_column,
    "saved dataset text column of ints": _dataset_int_column,
    "domain with only an empty file": _empty_domain,
    "output parent is a file": _parent_is_a_file,
    "output locked by another process": _output_locked,
    "a domain of identical documents": _identical_documents,
    "float-valued heldout_hashes.npy": _heldout_hashes_float,
    "pickled heldout_hashes.npy": _heldout_hashes_pickled,
    "garbage heldout_hashes.npy": _heldout_hashes_garbage,
    "heldout_hashes.npy links out of the folder": _heldout_hashes_link_out,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, tmp_path, tokenizer_dir, capsys):
    work = tmp_path / "work"
    _write_corpus(work / "corpus", {"code": 12, "prose": 12})
    extra, words, absent = CASES[case](work, tokenizer_dir)
    before = tree_digest(work)
    capsys.readouterr()
    try:
        assert main(_argv(work, tokenizer_dir) + extra) == 2  # a later --input/--output wins
        after = tree_digest(work)
    finally:
        while _HELD:
            _HELD.pop().release()
    err = one_error_line(capsys.readouterr().err)
    for w in words:
        assert w in err, f"{err!r} lacks {w!r}"
    for w in absent:
        assert w not in err, f"{err!r} should not say {w!r}"
    assert after == before


def test_overwrite_replaces_what_ddk_wrote(tmp_path, tokenizer_dir):
    work = tmp_path / "work"
    _write_corpus(work / "corpus", {"code": 12, "prose": 12})
    cfg = PrepareSection(
        input=str(work / "corpus"), output=str(work / "out"), seq_len=32, val_sequences=2
    )
    first = prepare(cfg, str(tokenizer_dir), progress=False)
    owner = first["owner"]
    assert owner["kind"] == "prepared" and "manifest.json" in owner["files"]
    assert "code/train.bin" in owner["files"]
    assert prepare(cfg, str(tokenizer_dir), progress=False) == first  # same corpus: a no-op
    again = prepare(
        cfg.model_copy(update={"seq_len": 16, "overwrite": True}),
        str(tokenizer_dir),
        progress=False,
    )
    assert again["seq_len"] == 16
    assert sorted(p.name for p in work.iterdir()) == ["corpus", "out"]  # no lock or tmp left


@pytest.mark.slow  # two interpreter start-ups
def test_second_prepare_process_is_refused_naming_the_holder(tmp_path, tokenizer_dir):
    work = tmp_path / "work"
    _write_corpus(work / "corpus", {"code": 12, "prose": 12})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from ddk.lock import FolderLock; "
            f"FolderLock({str(work / 'out')!r}, 'prepare', path={str(work / '.out.ddk.lock')!r})"
            ".acquire(); print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run(
            [sys.executable, "-m", "ddk.cli", *_argv(work, tokenizer_dir)],
            capture_output=True,
            text=True,
            env={**env, "TQDM_DISABLE": "1"},
            timeout=120,
        )
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert second.returncode == 2, second.stderr
    assert f"PID {holder.pid})" in one_error_line(second.stderr)
    assert not (work / "out").exists()
    # The holder is gone (the kernel dropped its lock): the same command now runs.
    assert main(_argv(work, tokenizer_dir)) == 0
    assert (work / "out" / "manifest.json").is_file()


def test_binary_files_and_links_into_the_corpus_are_skipped(tmp_path, tokenizer_dir, capsys):
    work = tmp_path / "work"
    corpus = _write_corpus(work / "corpus", {"code": 12, "prose": 12})
    (corpus / "code" / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 50)
    (corpus / "prose" / "blob.jsonl").write_bytes(bytes(range(1, 256)) * 40)  # no NUL
    (corpus / "dup").symlink_to(corpus / "code")
    (corpus / "up").symlink_to(corpus)
    (corpus / "prose" / "again.txt").symlink_to(corpus / "code" / "doc000.txt")
    cfg = PrepareSection(input=str(corpus), output=str(work / "out"), seq_len=16, val_sequences=2)
    m = prepare(cfg, str(tokenizer_dir), progress=False)
    err = capsys.readouterr().err
    assert set(m["domains"]) == {"code", "prose"}
    assert m["domains"]["code"]["documents"] == m["domains"]["prose"]["documents"] == 12
    for name in ("image.txt", "blob.jsonl", "dup", "'" + str(corpus / "up"), "again.txt"):
        assert name in err, f"no warning names {name}: {err}"
    assert "NUL bytes" in err and "undecodable or control characters" in err
    skipped = [line for line in err.splitlines() if line.startswith("warning: skipping")]
    assert len(skipped) == 5, err
    assert not any("again.txt" in s["path"] for s in m["sources"])


def test_output_parent_read_only(tmp_path, tokenizer_dir, capsys, mount_tmpfs):
    work = tmp_path / "work"
    _write_corpus(work / "corpus", {"code": 12, "prose": 12})
    ro = work / "ro"
    ro.mkdir()
    root = os.geteuid() == 0
    if root:  # root writes through permission bits: needs a read-only mount
        mount_tmpfs(ro, "ro,size=64k")
    else:
        ro.chmod(0o555)
    try:
        before = tree_digest(work)
        capsys.readouterr()
        assert main(_argv(work, tokenizer_dir, ro / "out")) == 2
        err = capsys.readouterr().err
        assert "read-only" in one_error_line(err) and str(ro) in err
        assert tree_digest(work) == before
    finally:
        if not root:
            ro.chmod(0o755)


def test_disk_full_says_how_much_space_is_needed(tmp_path, tokenizer_dir, capsys, mount_tmpfs):
    work = tmp_path / "work"
    corpus = _write_corpus(work / "corpus", {"code": 1500, "prose": 1500})  # ~ 600 KB
    small = mount_tmpfs(work / "small", "size=256k")
    read = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())
    before = tree_digest(work)
    capsys.readouterr()
    assert main(_argv(work, tokenizer_dir, small / "out")) == 2
    err = capsys.readouterr().err
    assert "disk full" in one_error_line(err), err
    need = re.search(r"needs up to ([\d.]+) (KB|MB)", err)
    assert need, err
    kb = float(need[1]) * (1000 if need[2] == "MB" else 1)
    assert kb * 1000 >= 2 * read  # two uint16 copies of at most a token per input byte
    assert list(small.iterdir()) == []  # temp folder and lock file removed
    assert tree_digest(work) == before


def test_long_document_pieces_equal_whole_document(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    encode = tok.backend_tokenizer.encode_batch
    rng = random.Random(0)
    seps = [" ", "  ", "\n", "\n\n", "\t", " . ", ", ", "   \n ", "!"]
    words = WORDS + ["ünïcødé", "✓", "x2", "123", "def", "(x):"]
    text = "".join(rng.choice(words) + rng.choice(seps) for _ in range(3000))
    for limit in (50, 64, 200, 1000):
        pieces = split_at_whitespace(text, limit)
        assert "".join(pieces) == text and len(pieces) > 1
        assert all(len(p) <= limit for p in pieces)
        whole = encode([text], add_special_tokens=False)[0].ids
        got = encode_documents(encode, [text, "short one"], limit)
        assert list(got[0]) == whole, limit
        assert got[1] == encode(["short one"], add_special_tokens=False)[0].ids
    # No whitespace at all: cut hard, still within the limit and losing nothing.
    assert "".join(split_at_whitespace("a" * 1000, 64)) == "a" * 1000


def test_prepare_tokenises_long_documents_in_pieces(tmp_path, tokenizer_dir, monkeypatch):
    corpus = tmp_path / "corpus"
    _write_corpus(corpus, {"code": 12, "prose": 12})
    (corpus / "prose" / "book.txt").write_text(" ".join(_docs("book", 40)))  # ~ 10 KB
    cfg = PrepareSection(input=str(corpus), seq_len=16, val_sequences=2)
    whole = prepare(
        cfg.model_copy(update={"output": str(tmp_path / "a")}), str(tokenizer_dir), progress=False
    )
    monkeypatch.setattr(longdocs, "PIECE_CHARS", 256)
    cut = prepare(
        cfg.model_copy(update={"output": str(tmp_path / "b")}), str(tokenizer_dir), progress=False
    )
    assert cut["domains"] == whole["domains"]
    for split in ("train", "val"):
        a = np.fromfile(tmp_path / "a" / "prose" / f"{split}.bin", dtype=np.uint16)
        b = np.fromfile(tmp_path / "b" / "prose" / f"{split}.bin", dtype=np.uint16)
        assert np.array_equal(a, b)


def test_sibling_lock_file_is_exclusive_and_removed_on_release(tmp_path):
    path = tmp_path / ".out.ddk.lock"
    held = FolderLock(tmp_path / "out", "prepare", path=path).acquire()
    assert path.read_text().strip() == str(os.getpid())
    with pytest.raises(DDKError, match=f"PID {os.getpid()}\\); wait for it"):
        FolderLock(tmp_path / "out", "prepare", path=path).acquire()
    held.release()
    assert sorted(tmp_path.iterdir()) == []  # neither the lock file nor the folder is left
    with FolderLock(tmp_path / "out", "prepare", path=path):
        assert path.exists()
    assert not path.exists()


def test_prepare_refuses_an_output_inside_its_input(tmp_path, capsys):
    # Before: accepted, and the next prepare read the output's manifest.json as a JSON corpus.
    corpus = tmp_path / "corpus"
    for domain in ("a", "b"):
        (corpus / domain).mkdir(parents=True)
        (corpus / domain / "doc.txt").write_text(f"text of {domain}")
    before = tree_digest(corpus)
    for out in (corpus / "prepared", corpus, corpus / "a" / ".." / "x"):
        argv = ["prepare", "--input", str(corpus), "--output", str(out), "--tokenizer", "none"]
        assert main(argv) == 2
        err = one_error_line(capsys.readouterr().err)
        assert "inside the input corpus" in err, err
        assert tree_digest(corpus) == before
    assert not (tmp_path / ".prepared.ddk.lock").exists()
