"""Byte spans at prepare (`ddk.data.offsets`): every window's text, token by token."""

from __future__ import annotations

import random

import numpy as np
import pytest
from transformers import AutoTokenizer

from ddk.config import PrepareSection
from ddk.data.dataset import PreparedData
from ddk.data.offsets import byte_ends, encode_with_ends, offsets_tokenizer
from ddk.data.prepare import prepare
from ddk.demo.build import train_bpe_tokenizer

PIECES = ["héllo", "wörld", "日本語", "✓", "def f(x):", "    return x", "\t", "  ", "\n\n", "42",
          "naïve", "🙂", "code_1", "über", "x = [1, 2]", "ümlaut"]  # fmt: skip


def random_texts(n: int, seed: int) -> list[str]:
    """Texts of code, whitespace runs and multi-byte UTF-8, with rare characters no merge
    covers (so byte-level BPE cuts them between tokens)."""
    rng = random.Random(seed)

    def piece() -> str:
        if rng.random() < 0.1:
            return chr(rng.choice([rng.randint(0x4E00, 0x9FFF), rng.randint(0x1F300, 0x1F5FF)]))
        return rng.choice(PIECES) + rng.choice(["", " ", "  ", "\n", "\t\t"])

    return ["".join(piece() for _ in range(rng.randint(3, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def unicode_tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(random_texts(300, 0), 320, tmp_path_factory.mktemp("utok"))


def test_byte_ends_are_the_bytes_of_each_token_prefix(unicode_tokenizer):
    tok = AutoTokenizer.from_pretrained(unicode_tokenizer)
    encoder = offsets_tokenizer(tok.backend_tokenizer)
    texts = random_texts(40, 1)
    all_ids, all_ends = encode_with_ends(encoder, texts)
    split_chars = 0
    for text, ids, ends in zip(texts, all_ids, all_ends):
        data = text.encode("utf-8")
        assert list(ids) == tok(text, add_special_tokens=False)["input_ids"]
        assert ends[-1] == len(data) and (np.diff(ends) >= 0).all()
        for i in range(len(ids)):
            if ends[i] == (ends[i - 1] if i else 0):  # zero width: ends inside a character
                split_chars += 1
                continue
            assert tok.decode(ids[: i + 1]).encode("utf-8") == data[: ends[i]]
    assert split_chars > 0  # the texts do make byte-level BPE cut characters


def test_long_documents_in_pieces_keep_their_offsets(unicode_tokenizer):
    tok = AutoTokenizer.from_pretrained(unicode_tokenizer)
    encoder = offsets_tokenizer(tok.backend_tokenizer)
    text = " ".join(random_texts(20, 2))
    whole_ids, whole_ends = encode_with_ends(encoder, [text])
    cut_ids, cut_ends = encode_with_ends(encoder, [text], limit=200)
    assert list(whole_ids[0]) == list(cut_ids[0])
    assert list(whole_ends[0]) == list(cut_ends[0])


def test_byte_ends_of_empty_and_plain_text():
    assert byte_ends([], "").tolist() == []
    assert byte_ends([(0, 2), (2, 3)], "aé ").tolist() == [3, 4]


@pytest.fixture(scope="module")
def spans_prepared(tmp_path_factory, unicode_tokenizer):
    root = tmp_path_factory.mktemp("ucorpus")
    for d, seed in (("mixed", 3), ("code", 4)):
        (root / d).mkdir()
        for i, t in enumerate(random_texts(60, seed)):
            (root / d / f"{i}.txt").write_text(t, encoding="utf-8")
    out = tmp_path_factory.mktemp("uprep") / "data"
    cfg = PrepareSection(input=str(root), output=str(out), seq_len=16, val_sequences=4,
                         heldout_windows_per_document=2, byte_spans=True)  # fmt: skip
    prepare(cfg, str(unicode_tokenizer), progress=False)
    return out


def test_every_window_decodes_to_its_stored_text(spans_prepared, unicode_tokenizer):
    tok = AutoTokenizer.from_pretrained(unicode_tokenizer)
    data = PreparedData(spans_prepared)
    assert data.has_byte_spans
    checked = 0
    for shard in data.domains.values():
        assert not list(shard.folder.glob("all_*"))  # temporary files are gone
        for split in ("train", "val", "test"):
            spans = shard.byte_spans(split)
            for w in range(shard.num_sequences(split)):
                start, n = shard.window_start(split, w)
                ids = shard._tokens(split)[start : start + n].tolist()
                text, ends = spans.window(start, n)
                # the first token's own text precedes the window's span start
                first = int(spans.ends[start - 1]) if start else 0
                assert ends[0] == int(spans.ends[start]) - first
                decoded = tok.decode(ids, skip_special_tokens=True).encode("utf-8")
                if b"\xef\xbf\xbd" in decoded:  # the window starts or ends inside a character
                    assert text.decode("utf-8")  # its stored text holds whole characters
                    continue
                assert decoded == text
                assert spans.target_bytes(start, n) == len(text) - ends[0]
                checked += 1
    assert checked > 20


def test_folders_without_spans_keep_working(prepared_dir):
    data = PreparedData(prepared_dir)
    assert not data.has_byte_spans
    with pytest.raises(Exception, match="byte_spans"):
        next(iter(data.domains.values())).byte_spans("val")
