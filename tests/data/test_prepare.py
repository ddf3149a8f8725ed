import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from ddk.cli import main
from ddk.config import PrepareSection
from ddk.data.dataset import PreparedData
from ddk.data.prepare import prepare, token_dtype
from ddk.errors import DDKError
from ddk.losses import IGNORE_INDEX


def _decode_docs(folder: Path, split: str, dtype, tok) -> dict[int, str]:
    tokens = np.fromfile(folder / f"{split}.bin", dtype=dtype)
    docs = np.load(folder / f"{split}_docs.npy")
    out, pos = {}, 0
    for doc_id, length in docs:
        ids = tokens[pos : pos + length]
        assert ids[-1] == tok.eos_token_id
        out[int(doc_id)] = tok.decode(ids[:-1].tolist())
        pos += length
    assert pos == len(tokens)
    return out


def _held_out_pieces(folder: Path, split: str, dtype) -> dict[int, tuple[int, ...]]:
    tokens = np.fromfile(folder / f"{split}.bin", dtype=dtype)
    out, pos = {}, 0
    for doc_id, length in np.load(folder / f"{split}_docs.npy"):
        out[int(doc_id)] = tuple(tokens[pos : pos + length].tolist())
        pos += length
    assert pos == len(tokens)
    return out


def test_round_trip_and_disjoint_split(prepared_dir, corpus, tokenizer_dir):
    _, docs = corpus
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    dtype = np.dtype(manifest["token_dtype"])
    for domain, texts in docs.items():
        folder = prepared_dir / manifest["domains"][domain]["folder"]
        info = manifest["domains"][domain]
        train = _decode_docs(folder, "train", dtype, tok)
        held = {s: _held_out_pieces(folder, s, dtype) for s in ("val", "test")}
        assert not set(train) & set(held["val"]), "a document is in train and val"
        assert not set(train) & set(held["test"]), "a document is in train and test"
        assert not set(held["val"]) & set(held["test"]), "a document is in val and test"
        # held-out: a whole document, or its first 32 * w + 1 tokens
        encoded = [tuple(tok(t, add_special_tokens=False)["input_ids"] + [0]) for t in texts]
        for split, pieces in held.items():
            for p in pieces.values():
                whole = [e for e in encoded if e[: len(p)] == p]
                assert whole and (len(p) in map(len, whole) or len(p) % 32 == 1), p
                assert len(p) <= 4 * 32 + 1
            # a split of 4 windows (< split.MIN_DOCUMENTS) takes one window per document
            assert info[f"{split}_documents"] == len(pieces) == info[f"{split}_sequences"] == 4
            assert info[f"{split}_tokens"] == sum(map(len, pieces.values()))
        assert info["total_tokens"] == sum(map(len, encoded))
        # every token is in one split, past a held-out document's windows, or a dropped copy
        assert info["total_tokens"] == sum(
            info[k]
            for k in (
                "train_tokens",
                "val_tokens",
                "test_tokens",
                "heldout_unused_tokens",
                "duplicate_tokens",
            )
        )
        assert set(train.values()) <= set(texts)
        assert info["documents"] == len(texts)
        assert info["train_documents"] + len(held["val"]) + len(held["test"]) + info[
            "duplicates_dropped"
        ] == len(texts)
        assert info["train_sequences"] == (info["train_tokens"] - 1) // 32


def test_manifest_contents(prepared_dir, tokenizer_dir, corpus):
    m = json.loads((prepared_dir / "manifest.json").read_text())
    assert set(m["domains"]) == set(corpus[1])
    assert m["seq_len"] == 32 and m["val_sequences"] == 4
    assert m["token_dtype"] == "uint16"
    assert m["tokenizer"]["vocab_size"] == len(AutoTokenizer.from_pretrained(tokenizer_dir))
    assert m["tokenizer"]["name_or_path"] == str(tokenizer_dir)
    assert m["ddk_version"]
    assert all(len(s["sha256"]) == 64 for s in m["sources"])
    assert {s["domain"] for s in m["sources"]} == set(corpus[1])


def test_prepared_data_windows(prepared_dir):
    data = PreparedData(prepared_dir)
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    for name, shard in data.domains.items():
        folder = prepared_dir / manifest["domains"][name]["folder"]
        for split in ("val", "test"):
            # naive reference: each document's piece cut at every 32 tokens, one overlapping
            expected = []
            for piece in _held_out_pieces(folder, split, np.uint16).values():
                for j in range(0, len(piece) - 1, 32):
                    expected.append(piece[j : j + 33])
            n = shard.num_sequences(split)
            assert n == len(expected) == 4
            inputs, labels = shard.heldout_batch(split, range(n))
            assert inputs.shape == labels.shape == (n, max(map(len, expected)) - 1)
            for row, window in enumerate(expected):
                k = len(window) - 1
                assert inputs[row, :k].tolist() == list(window[:-1])
                assert labels[row, :k].tolist() == list(window[1:])
                assert (labels[row, k:] == IGNORE_INDEX).all()  # past its document: not scored
            assert shard.window_lengths(split).tolist() == list(map(len, expected))
    train = data.domains["math"].sequences("train", [data.domains["math"].num_train_sequences - 1])
    assert train.shape == (1, 33)
    with pytest.raises(ValueError, match="heldout_batch"):
        data.domains["math"].sequences("val", [0])


def test_token_dtype_choice():
    assert token_dtype(32000) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(151936) == np.uint32


def test_domain_field_jsonl_and_rerun(tmp_path, tokenizer_dir):
    src = tmp_path / "all.jsonl"
    rows = [{"body": f"text number {i} " * 20, "src": ["a", "b"][i % 2]} for i in range(60)]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = PrepareSection(
        input=str(src),
        output=str(tmp_path / "out"),
        seq_len=16,
        val_sequences=2,
        text_field="body",
        domain_field="src",
    )
    m = prepare(cfg, str(tokenizer_dir), progress=False)
    assert set(m["domains"]) == {"a", "b"}
    assert m["domains"]["a"]["documents"] == 30
    # same corpus again: nothing to do, same manifest
    assert prepare(cfg, str(tokenizer_dir), progress=False)["created"] == m["created"]


def test_hf_saved_dataset(tmp_path, tokenizer_dir):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"text": [f"row {i} " * 30 for i in range(40)], "domain": ["x", "y"] * 20}
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = PrepareSection(
        input=str(tmp_path / "ds"), output=str(tmp_path / "o"), seq_len=16, val_sequences=2
    )
    m = prepare(cfg, str(tokenizer_dir), progress=False)
    assert {d: v["documents"] for d, v in m["domains"].items()} == {"x": 20, "y": 20}


def _bad_inputs(tmp: Path):
    """(name, input path, extra config, expected words in the message)."""
    cases = []
    cases.append(("missing path", tmp / "nope", {}, ["does not exist"]))
    empty = tmp / "empty_domain"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "x.jsonl").write_text(json.dumps({"text": "hello " * 400}) + "\n")
    (empty / "b").mkdir()
    cases.append(("empty domain", empty, {}, ["domain 'b'", "holds no"]))
    small = tmp / "small"
    (small / "a").mkdir(parents=True)
    (small / "a" / "x.jsonl").write_text(json.dumps({"text": "tiny"}) + "\n")
    cases.append(("too little text", small, {}, ["domain 'a'", "too little"]))
    badjson = tmp / "badjson"
    (badjson / "a").mkdir(parents=True)
    (badjson / "a" / "x.jsonl").write_text('{"text": "ok"}\n{not json\n')
    cases.append(("bad json", badjson, {}, ["x.jsonl line 2", "not valid JSON"]))
    notext = tmp / "notext"
    (notext / "a").mkdir(parents=True)
    (notext / "a" / "x.jsonl").write_text('{"content": "ok"}\n')
    cases.append(("no text field", notext, {}, ["line 1", "'text'", "text_field"]))
    mixed = tmp / "mixed"
    (mixed / "a").mkdir(parents=True)
    (mixed / "a" / "x.txt").write_text("hi")
    (mixed / "loose.jsonl").write_text('{"text": "x", "domain": "a"}\n')
    cases.append(("mixed layouts", mixed, {}, ["mixes", "loose.jsonl"]))
    nodomain = tmp / "nodomain.jsonl"
    nodomain.write_text('{"text": "hello"}\n')
    cases.append(("missing domain field", nodomain, {}, ["no 'domain' field", "domain_field"]))
    nulldomain = tmp / "nulldomain.jsonl"
    nulldomain.write_text('{"text": "hello", "domain": null}\n')
    cases.append(("null domain", nulldomain, {}, ["line 1", "no 'domain' field"]))
    onedoc = tmp / "onedoc"
    (onedoc / "a").mkdir(parents=True)
    (onedoc / "a" / "book.txt").write_text("one long book " * 500)
    cases.append(("single document", onedoc, {}, ["domain 'a'", "split its text"]))
    return cases


def test_bad_inputs_give_one_line_errors(tmp_path, tokenizer_dir):
    for name, path, extra, words in _bad_inputs(tmp_path / "in"):
        out = tmp_path / "out" / name.replace(" ", "_")
        cfg = PrepareSection(input=str(path), output=str(out), seq_len=16, val_sequences=2, **extra)
        with pytest.raises(DDKError) as err:
            prepare(cfg, str(tokenizer_dir), progress=False)
        msg = str(err.value)
        assert "\n" not in msg, name
        for w in words:
            assert w in msg, f"{name}: {msg!r} lacks {w!r}"
        assert not out.exists(), f"{name}: left a half-written output"
        assert not list(out.parent.glob(".*tmp*")) if out.parent.exists() else True


def test_output_that_is_a_file(tmp_path, corpus, tokenizer_dir):
    target = tmp_path / "file"
    target.write_text("mine")
    cfg = PrepareSection(input=str(corpus[0]), output=str(target))
    with pytest.raises(DDKError, match="is a file; choose a folder"):
        prepare(cfg, str(tokenizer_dir), progress=False)
    assert target.read_text() == "mine"


def test_missing_tokenizer_path(tmp_path, corpus):
    cfg = PrepareSection(input=str(corpus[0]), output=str(tmp_path / "o"))
    with pytest.raises(DDKError, match="tokenizer path './no/such/tok' does not exist"):
        prepare(cfg, "./no/such/tok", progress=False)


def test_refuses_other_corpus_unless_overwrite(tmp_path, corpus, tokenizer_dir, prepared_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    cfg = PrepareSection(input=str(corpus[0]), output=str(out), seq_len=32, val_sequences=4)
    for overwrite in (False, True):  # --overwrite replaces prepared data, never other files
        with pytest.raises(DDKError, match="ddk did not write.*choose another folder"):
            prepare(
                cfg.model_copy(update={"overwrite": overwrite}), str(tokenizer_dir), progress=False
            )
        assert (out / "keep.txt").read_text() == "user file"
    (out / "keep.txt").unlink()
    prepare(cfg.model_copy(update={"seq_len": 16}), str(tokenizer_dir), progress=False)
    # a folder prepared from another corpus (different seq_len) is refused as well
    other = cfg.model_copy(update={"output": str(prepared_dir), "seq_len": 16})
    before = (prepared_dir / "manifest.json").read_text()
    with pytest.raises(DDKError, match="different prepared corpus"):
        prepare(other, str(tokenizer_dir), progress=False)
    assert (prepared_dir / "manifest.json").read_text() == before
    m = prepare(cfg.model_copy(update={"overwrite": True}), str(tokenizer_dir), progress=False)
    assert m["seq_len"] == 32 and set(m["domains"]) == set(corpus[1])
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 32


def test_cli_prepare_exit_codes(tmp_path, corpus, tokenizer_dir, capsys):
    out = tmp_path / "cli_out"
    args = [
        "prepare",
        "--input",
        str(corpus[0]),
        "--output",
        str(out),
        "--tokenizer",
        str(tokenizer_dir),
        "--seq-len",
        "32",
        "--val-sequences",
        "4",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "train tokens" in printed and "total" in printed and "math" in printed
    assert (
        main(
            [
                "prepare",
                "--input",
                str(tmp_path / "missing"),
                "--output",
                str(out),
                "--tokenizer",
                str(tokenizer_dir),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: input path") and "\n" not in err
