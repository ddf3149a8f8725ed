"""Held-out validation and test sets: many documents, disjoint by document and by text hash,
BOS as the tokenizer (or prepare.add_bos) says."""

import json
from pathlib import Path

import numpy as np
import pytest

from ddk.config import PrepareSection
from ddk.data.dataset import PreparedData
from ddk.data.dedup import text_hash
from ddk.data.prepare import prepare
from ddk.data.split import DROPPED, HELDOUT, TRAIN, choose_heldout
from ddk.errors import DDKError

WORDS = [f"w{i}" for i in range(40)]


def word_tokenizer(out: Path, *, llama_style: bool) -> Path:
    """A word-level fast tokenizer. LLaMA-style: `<s>` added by a post-processor (as LLaMA-2 and
    TinyLlama do with add_special_tokens=True); Qwen-style: no BOS token at all."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"eos_token": "<eos>", "unk_token": "<unk>"}
    if llama_style:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
        special["bos_token"] = "<s>"
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(out)
    return out


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def read_split(folder: Path, split: str) -> list[tuple[int, np.ndarray]]:
    """(document id, its tokens in the split) in file order."""
    tokens = np.fromfile(folder / f"{split}.bin", dtype=np.uint16)
    out, pos = [], 0
    for doc_id, n in np.load(folder / f"{split}_docs.npy"):
        out.append((int(doc_id), tokens[pos : pos + n]))
        pos += n
    assert pos == len(tokens)
    return out


def test_choose_heldout_rules():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 60, 300)
    lens[7] = 10_000  # one long document: over the budget, so it stays in training
    hashes = rng.integers(0, 2**63, 300).astype(np.uint64)
    hashes[100:150] = hashes[50:100]  # 50 exact duplicates
    codes, drawn = choose_heldout(
        lens, hashes, rng.permutation(300), 16, {"val": 20, "test": 10}, int(lens.sum()) // 2
    )
    assert codes[7] == TRAIN
    for split, docs in drawn.items():
        assert all(codes[d] == HELDOUT[split] for d in docs)
        got = int(np.minimum(lens[docs], 16).sum())
        n = {"val": 20, "test": 10}[split]
        assert got >= n * 16 + 1  # enough tokens for n windows ...
        assert got - min(int(lens[docs[-1]]), 16) < n * 16 + 1  # ... and no document more
    assert not set(drawn["val"]) & set(drawn["test"])
    held = codes > TRAIN
    assert int(lens[held].sum()) <= int(lens.sum()) // 2
    held_hashes = set(hashes[held].tolist())
    assert len(held_hashes) == int(held.sum())  # never the same text held out twice
    train_hashes = set(hashes[codes == TRAIN].tolist())
    assert not held_hashes & train_hashes
    dropped = np.flatnonzero(codes == DROPPED)
    assert len(dropped) > 0 and all(int(hashes[d]) in held_hashes for d in dropped)


def test_one_long_document_cannot_fill_validation(tmp_path):
    tok = word_tokenizer(tmp_path / "tok", llama_style=False)
    rng = np.random.default_rng(1)
    book = words(rng, 1_000_000)
    short = [words(rng, int(rng.integers(20, 30))) for _ in range(600)]
    write_jsonl(tmp_path / "corpus" / "books" / "a.jsonl", [book, *short])
    out = tmp_path / "out"
    cfg = PrepareSection(
        input=str(tmp_path / "corpus"),
        output=str(out),
        seq_len=16,
        val_sequences=500,
        test_sequences=40,
    )
    m = prepare(cfg, str(tok), progress=False)
    info = m["domains"]["books"]
    assert info["val_sequences"] == 500 and info["val_documents"] >= 500
    assert info["test_sequences"] == 40 and info["test_documents"] >= 40
    folder = out / info["folder"]
    val, test = read_split(folder, "val"), read_split(folder, "test")
    assert all(len(t) <= 16 for _, t in val + test)  # at most one window's worth per document
    held_ids = {i for i, _ in val + test}
    assert 0 not in held_ids  # the book is kept for training, not wasted on one window
    assert info["train_tokens"] > 1_000_000
    data = PreparedData(out)
    shard = data.domains["books"]
    assert data.has_split("test")
    assert shard.sequences("val", range(shard.num_sequences("val"))).shape == (500, 17)
    assert shard.sequences("test", [39]).shape == (1, 17)


def test_splits_disjoint_by_document_and_by_text_hash(tmp_path):
    tok = word_tokenizer(tmp_path / "tok", llama_style=False)
    rng = np.random.default_rng(2)
    unique = [words(rng, int(rng.integers(5, 40))) for _ in range(120)]
    # every text twice, once with other spacing: the same document after normalisation
    texts = unique + ["  " + t.replace(" ", "   ") + " " for t in unique]
    write_jsonl(tmp_path / "corpus" / "d" / "a.jsonl", texts)
    out = tmp_path / "out"
    cfg = PrepareSection(
        input=str(tmp_path / "corpus"), output=str(out), seq_len=8, val_sequences=10
    )
    m = prepare(cfg, str(tok), progress=False)
    info = m["domains"]["d"]
    folder = out / info["folder"]
    ids = {s: {i for i, _ in read_split(folder, s)} for s in ("train", "val", "test")}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    hashes = {s: {text_hash(texts[i]) for i in ids[s]} for s in ids}
    assert not hashes["train"] & (hashes["val"] | hashes["test"])
    assert not hashes["val"] & hashes["test"]
    # each held-out document's twin is dropped from training and counted
    assert info["duplicates_dropped"] == info["val_documents"] + info["test_documents"]
    assert info["train_documents"] + 2 * info["duplicates_dropped"] == len(texts)
    recorded = np.load(folder / "heldout_hashes.npy")
    assert recorded.dtype == np.uint64
    assert set(recorded.tolist()) == hashes["val"] | hashes["test"]
    assert set(PreparedData(out).domains["d"].heldout_hashes().tolist()) == set(recorded.tolist())


@pytest.mark.parametrize(
    "llama_style, add_bos, expect_bos",
    [(True, None, True), (False, None, False), (True, False, False)],
    ids=["llama-default", "qwen-default", "llama-off"],
)
def test_bos_follows_the_tokenizer(tmp_path, llama_style, add_bos, expect_bos):
    tok = word_tokenizer(tmp_path / "tok", llama_style=llama_style)
    rng = np.random.default_rng(3)
    write_jsonl(tmp_path / "c" / "d" / "a.jsonl", [words(rng, 12) for _ in range(60)])
    out = tmp_path / "out"
    cfg = PrepareSection(
        input=str(tmp_path / "c"), output=str(out), seq_len=8, val_sequences=3, add_bos=add_bos
    )
    m = prepare(cfg, str(tok), progress=False)
    assert m["add_bos"] is expect_bos
    folder = out / m["domains"]["d"]["folder"]
    for split in ("train", "val", "test"):
        firsts = [int(t[0]) for _, t in read_split(folder, split)]
        assert firsts and all((f == 1) is expect_bos for f in firsts), split
        # BOS only at document starts: nowhere else
        assert int((np.fromfile(folder / f"{split}.bin", np.uint16) == 1).sum()) == (
            len(firsts) if expect_bos else 0
        )


def test_add_bos_without_a_bos_token_is_one_line(tmp_path):
    tok = word_tokenizer(tmp_path / "tok", llama_style=False)
    write_jsonl(tmp_path / "c" / "d" / "a.jsonl", ["w1 w2 w3"] * 10)
    cfg = PrepareSection(
        input=str(tmp_path / "c"), output=str(tmp_path / "o"), seq_len=8, add_bos=True
    )
    with pytest.raises(DDKError, match="add_bos is true but tokenizer .* has no BOS token"):
        prepare(cfg, str(tok), progress=False)
    assert not (tmp_path / "o").exists()


def test_warns_when_a_domain_has_too_few_documents(tmp_path, capsys):
    tok = word_tokenizer(tmp_path / "tok", llama_style=False)
    rng = np.random.default_rng(4)
    write_jsonl(tmp_path / "c" / "d" / "a.jsonl", [words(rng, 20) for _ in range(40)])
    cfg = PrepareSection(
        input=str(tmp_path / "c"), output=str(tmp_path / "o"), seq_len=8, val_sequences=30
    )
    m = prepare(cfg, str(tok), progress=False)
    info = m["domains"]["d"]
    # at most half of the tokens are held out: 20 documents, shared between val and test
    assert info["val_documents"] + info["test_documents"] <= 20
    assert 0 < info["val_sequences"] < 30 and 0 < info["test_sequences"] < 30
    assert info["train_documents"] >= 20
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(lines) == 2
    assert "domain 'd': validation has" in lines[0] and "of 30 windows" in lines[0]
    assert "domain 'd': test has" in lines[1]
