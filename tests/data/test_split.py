"""Held-out validation and test sets: many documents, disjoint by document and by text hash,
BOS as the tokenizer (or prepare.add_bos) says."""

import json
from pathlib import Path

import numpy as np
import pytest

from ddk.config import PrepareSection
from ddk.data.dataset import PreparedData
from ddk.data.dedup import text_hash
from ddk.data.manifest import read_manifest
from ddk.data.prepare import prepare, summary_table
from ddk.data.sources import discover, iter_documents
from ddk.data.split import (
    DROPPED,
    HELDOUT,
    TRAIN,
    choose_heldout,
    document_windows,
    per_document_cap,
    split_codes,
    window_spans,
)
from ddk.errors import DDKError
from tests.conftest import make_documents

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


def test_window_spans_match_a_naive_cut():
    rng = np.random.default_rng(5)
    stored = rng.integers(1, 60, 50)
    stored[:4] = [1, 2, 17, 33]  # no target, one target, exactly 16 + 1, exactly 2 * 16 + 1
    starts, lengths = window_spans(stored, 16)
    expected, pos = [], 0
    for n in stored.tolist():
        expected += [(pos + j, min(17, n - j)) for j in range(0, n - 1, 16)]
        pos += n
    assert list(zip(starts.tolist(), lengths.tolist())) == expected
    assert document_windows(stored, 16).tolist() == [
        len(range(0, n - 1, 16)) for n in stored.tolist()
    ]


def test_choose_heldout_rules():
    rng = np.random.default_rng(0)
    lens = rng.integers(2, 60, 300)
    lens[7] = 10_000  # one long document: over the budget, so it stays in training
    hashes = rng.integers(0, 2**63, 300).astype(np.uint64)
    hashes[100:150] = hashes[50:100]  # 50 exact duplicates
    taken = set(hashes[200:220].tolist())  # texts another domain holds out
    wanted = {"val": 96, "test": 20}
    cap = {"val": 2, "test": 1}  # test: 20 windows from fewer than 32 documents would be too few
    assert {s: per_document_cap(n, 2) for s, n in wanted.items()} == cap
    budget = int(lens.sum()) // 2
    drawn = choose_heldout(
        lens, hashes, rng.permutation(300), 16, wanted, budget, per_document=2, taken=taken
    )
    for split, docs in drawn.items():
        windows = [n for _, n in docs]
        assert sum(windows) == wanted[split]  # exactly the windows asked for
        assert all(1 <= n <= min(cap[split], (int(lens[i]) - 2) // 16 + 1) for i, n in docs)
    assert max(n for _, n in drawn["val"]) == 2
    picked = [i for docs in drawn.values() for i, _ in docs]
    assert 7 not in picked and not set(picked) & set(range(200, 220))
    assert int(lens[picked].sum()) <= budget
    assert len(set(hashes[picked].tolist())) == len(picked)  # never the same text held out twice
    held = np.unique(hashes[picked])
    codes = split_codes(300, hashes, drawn, held)
    for split, docs in drawn.items():
        assert all(codes[i] == HELDOUT[split] for i, _ in docs)
    train = set(hashes[codes == TRAIN].tolist())
    assert not train & set(held.tolist())
    dropped = np.flatnonzero(codes == DROPPED)
    assert len(dropped) > 0 and all(int(hashes[d]) in set(held.tolist()) for d in dropped)


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
        heldout_windows_per_document=2,
    )
    m = prepare(cfg, str(tok), progress=False)
    info = m["domains"]["books"]
    assert info["val_sequences"] == 500 and info["val_documents"] >= 250
    assert info["test_sequences"] == 40 and info["test_documents"] >= 20
    folder = out / info["folder"]
    val, test = read_split(folder, "val"), read_split(folder, "test")
    assert all(len(t) <= 2 * 16 + 1 for _, t in val + test)  # at most two windows per document
    held_ids = {i for i, _ in val + test}
    assert 0 not in held_ids  # the book is kept for training, not wasted on two windows
    assert info["train_tokens"] > 1_000_000
    data = PreparedData(out)
    shard = data.domains["books"]
    assert data.has_split("test")
    assert shard.num_sequences("val") == 500 and shard.num_sequences("test") == 40
    inputs, labels = shard.heldout_batch("test", [39])
    assert inputs.shape == labels.shape and inputs.shape[0] == 1 and inputs.shape[1] <= 16


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
    # 80 documents of 21 tokens: 3 windows of 8 targets each, at most 2 held out per document
    write_jsonl(tmp_path / "c" / "d" / "a.jsonl", [words(rng, 20) for _ in range(80)])
    cfg = PrepareSection(
        input=str(tmp_path / "c"),
        output=str(tmp_path / "o"),
        seq_len=8,
        val_sequences=100,
        heldout_windows_per_document=2,
    )
    m = prepare(cfg, str(tok), progress=False)
    info = m["domains"]["d"]
    # at most half of the tokens are held out: 40 documents, shared between val and test
    assert info["val_documents"] + info["test_documents"] == 40
    assert info["val_sequences"] == info["test_sequences"] == 40
    assert info["train_documents"] == 40
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(lines) == 2
    assert "domain 'd': validation has 40 of 100 windows" in lines[0]
    assert "at most 2 window(s) of 8 tokens from each" in lines[0]
    assert "domain 'd': test has 40 of 100 windows" in lines[1]


def split_hashes(out: Path, corpus: Path) -> dict[tuple[str, str], list[int]]:
    """{(domain, split): text hash of each of its documents}, the documents found by their
    corpus ids (prepare numbers the non-blank documents in reading order)."""
    stream = iter_documents(discover(str(corpus)), "text", "domain")
    texts = [t for _, t, _ in stream if t is not None and t.strip()]
    manifest = read_manifest(out)
    return {
        (name, split): [
            text_hash(texts[i]) for i in np.load(out / info.folder / f"{split}_docs.npy")[:, 0]
        ]
        for name, info in manifest.domains.items()
        for split in ("train", "val", "test")
    }


def assert_no_text_in_two_splits(found: dict[tuple[str, str], list[int]]) -> None:
    """Training may repeat a text (in one domain or across domains); a held-out text is in
    exactly one held-out split of one domain and nowhere in training."""
    held = [h for (_, split), hs in found.items() if split != "train" for h in hs]
    assert len(held) == len(set(held)), "a text is held out twice"
    train = {h for (_, split), hs in found.items() if split == "train" for h in hs}
    leaked = {key: len(set(hs) & train) for key, hs in found.items() if key[1] != "train"}
    assert not any(leaked.values()), f"held-out texts in training: {leaked}"


@pytest.mark.parametrize("mode", ["labelled", "split_domains"])
def test_held_out_text_never_leaks_across_domains(tmp_path, tokenizer_dir, mode):
    """The issue's case: `math_copy` holds the first 300 `math` documents."""
    math = make_documents("math", 400, seed=0)
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "math" / "a.jsonl", math)
    write_jsonl(corpus / "math_copy" / "a.jsonl", math[:300])
    out = tmp_path / "out"
    extra = {"split_domains": 2, "cluster_sample": 400} if mode == "split_domains" else {}
    cfg = PrepareSection(input=str(corpus), output=str(out), seq_len=32, val_sequences=8, **extra)
    m = prepare(cfg, str(tokenizer_dir), progress=False)
    found = split_hashes(out, corpus)
    assert_no_text_in_two_splits(found)
    # every dropped duplicate is counted, in the domain whose training lost it
    total = sum(len(texts) for texts in (math, math[:300]))
    kept = sum(len(hs) for hs in found.values())
    assert sum(d["duplicates_dropped"] for d in m["domains"].values()) == total - kept > 0


def test_long_documents_give_their_remainder_to_more_windows(tmp_path):
    """A domain of long documents: a held-out document scores up to
    heldout_windows_per_document windows, so far fewer of its tokens end in no split; the share
    that does is in the manifest and the summary."""
    tok = word_tokenizer(tmp_path / "tok", llama_style=False)
    rng = np.random.default_rng(6)
    texts = [words(rng, int(rng.integers(60, 200))) for _ in range(600)]
    write_jsonl(tmp_path / "c" / "books" / "a.jsonl", texts)
    lens = np.array([len(t.split()) + 1 for t in texts])  # + EOS
    unused = {}
    for cap in (1, 4):
        out = tmp_path / f"out{cap}"
        cfg = PrepareSection(
            input=str(tmp_path / "c"),
            output=str(out),
            seq_len=16,
            val_sequences=128,
            heldout_windows_per_document=cap,
        )
        m = prepare(cfg, str(tok), progress=False)
        info = m["domains"]["books"]
        assert m["heldout_windows_per_document"] == cap
        assert info["val_sequences"] == info["test_sequences"] == 128
        held = read_split(out / info["folder"], "val") + read_split(out / info["folder"], "test")
        assert len(held) == info["val_documents"] + info["test_documents"] == 256 // cap
        assert all(len(t) == min(lens[i], 16 * cap + 1) or len(t) % 16 == 1 for i, t in held)
        lost = sum(int(lens[i]) - len(t) for i, t in held)
        assert info["heldout_unused_tokens"] == lost and info["total_tokens"] == lens.sum()
        unused[cap] = lost / lens.sum()
        assert f"{100 * unused[cap]:.1f}%" in summary_table(m).splitlines()[2]
    assert unused[4] < unused[1] / 3


def test_a_domain_made_of_another_domains_held_out_text_says_so(tmp_path):
    tok = word_tokenizer(tmp_path / "tok", llama_style=False)
    rng = np.random.default_rng(7)
    texts = [words(rng, int(rng.integers(10, 20))) for _ in range(80)]
    write_jsonl(tmp_path / "c" / "a" / "a.jsonl", texts)
    cfg = dict(seq_len=8, val_sequences=4)
    first = PrepareSection(input=str(tmp_path / "c"), output=str(tmp_path / "o1"), **cfg)
    m = prepare(first, str(tok), progress=False)
    folder = tmp_path / "o1" / m["domains"]["a"]["folder"]
    held = [texts[i] for s in ("val", "test") for i, _ in read_split(folder, s)]
    # `b` holds exactly the texts `a` holds out (a is drawn first, the same way as alone)
    write_jsonl(tmp_path / "c" / "b" / "a.jsonl", held * 3)
    both = PrepareSection(input=str(tmp_path / "c"), output=str(tmp_path / "o2"), **cfg)
    with pytest.raises(DDKError, match=r"domain 'b': 8 of its 8 distinct texts are held out by"):
        prepare(both, str(tok), progress=False)
