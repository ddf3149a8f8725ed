"""Byte alignment of two real tokenizers (`ddk.teacher.alignment`, `ddk.teacher.retokenize`):
property tests over random texts with multi-byte UTF-8, code and whitespace runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ddk.data.offsets import encode_with_ends, offsets_tokenizer
from ddk.demo.build import train_bpe_tokenizer
from ddk.teacher import alignment
from ddk.teacher.alignment import BOS, EOS, TEXT, Tokens, align, identity_alignment
from ddk.teacher.retokenize import Retokenizer, decode_problem, shared_vocabulary, token_bytes
from tests.data.test_offsets import random_texts

UNK, EOS_TOKEN = "<unk>", "<|endoftext|>"


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """Two genuinely different byte-level BPEs: 300 tokens, and 700 with digits split."""
    texts = random_texts(400, 7)
    small = train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("small"))
    large = train_bpe_tokenizer(texts, 700, tmp_path_factory.mktemp("large"), split_digits=True)
    return AutoTokenizer.from_pretrained(small), AutoTokenizer.from_pretrained(large)


def train_unigram_tokenizer(texts: list[str], extra: int, out_dir) -> Path:
    """A SentencePiece-style unigram LM tokenizer: '▁' for spaces (no prefix added), `extra`
    pieces beyond the training alphabet (the trainer needs every character in its
    vocabulary), and byte fallback (<0xNN> pieces) for characters it never saw, so it decodes
    back to any text."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    alphabet = len(set("".join(texts).replace(" ", "")))
    trainer = trainers.UnigramTrainer(vocab_size=alphabet + extra, special_tokens=[UNK, EOS_TOKEN],
                                      unk_token=UNK, max_piece_length=8, show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    pieces = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    floor = min(score for _, score in pieces) - 1.0  # bytes only where no piece fits
    pieces += [(f"<0x{b:02X}>", floor) for b in range(256)]
    unigram = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    unigram.pre_tokenizer = tok.pre_tokenizer
    unigram.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    unigram.add_special_tokens([UNK, EOS_TOKEN])
    fast = PreTrainedTokenizerFast(tokenizer_object=unigram, eos_token=EOS_TOKEN, unk_token=UNK)
    fast.save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="module")
def bpe_and_unigram(tmp_path_factory, two_tokenizers):
    """The 300-token byte-level BPE and a unigram LM tokenizer trained on the same texts."""
    out = train_unigram_tokenizer(random_texts(400, 7), 300, tmp_path_factory.mktemp("uni"))
    return two_tokenizers[0], AutoTokenizer.from_pretrained(out)


def student_window(tok, texts: list[str], rng: random.Random, cut: int | None = None):
    """A packed window like prepare's: documents joined by EOS (some with a leading EOS as
    BOS stand-in), with text, ids and byte ends."""
    enc = offsets_tokenizer(tok.backend_tokenizer)
    ids, ends, text, base = [], [], b"", 0
    for t in texts:
        t_ids, t_ends = encode_with_ends(enc, [t])
        ids += list(t_ids[0]) + [tok.eos_token_id]
        ends += list(t_ends[0] + base) + [base + len(t.encode())]
        text += t.encode()
        base = len(text)
    cut = rng.randint(0, 3) if cut is None else cut  # windows may start inside a document
    first = ends[cut - 1] if cut else 0
    return text[first:], np.asarray(ids[cut:]), np.asarray(ends[cut:], dtype=np.int64) - first


def _bytes(tok, table, ids) -> bytes:
    return b"".join(table.get(int(i), b"") for i in ids)


def check_alignment(student, teacher, seed: int) -> np.ndarray:
    """One random window of `student`, re-read by `teacher`: every aligned pair has seen the
    same bytes and specials (read from the ids, not the offsets), every exact pair's next
    tokens are the same bytes, and every mismatched span covers the same bytes on both sides."""
    rng = random.Random(seed)
    s_tab, t_tab = token_bytes(student), token_bytes(teacher)
    text, s_ids, s_ends = student_window(student, random_texts(rng.randint(1, 3), seed), rng)
    retok = Retokenizer(teacher, None, student.eos_token_id)
    s_tokens = retok.student_tokens(s_ids, s_ends)
    t_ids, t_tokens = retok.window(text, s_tokens)
    a = align(s_tokens, t_tokens)
    assert len(a.student_pos) > 0.3 * len(s_ids)
    for i, k, exact in zip(a.student_pos, a.teacher_pos, a.exact):
        # the same text so far, read from the ids themselves (not from the offsets)
        assert _bytes(student, s_tab, s_ids[: i + 1]) == _bytes(teacher, t_tab, t_ids[: k + 1])
        assert (s_tokens.kinds[: i + 1] != TEXT).sum() == (t_tokens.kinds[: k + 1] != TEXT).sum()
        if exact:  # and the same next token's bytes (or the same special)
            assert s_tokens.kinds[i + 1] == t_tokens.kinds[k + 1]
            assert s_tab.get(int(s_ids[i + 1]), b"") == t_tab.get(int(t_ids[k + 1]), b"")
    assert a.exact.any() and not a.exact.all()  # different tokenizers: both kinds occur
    spans = alignment.mismatch_spans(a, s_tokens, t_tokens)
    assert len(spans) >= (~a.exact).sum() - 1  # all but a span cut inside a character
    for s0, s1, t0, t1 in spans.tolist():  # the tokens each side predicts in the span
        assert s1 > s0 and t1 > t0
        s_span, t_span = s_ids[s0 + 1 : s1 + 1], t_ids[t0 + 1 : t1 + 1]
        assert _bytes(student, s_tab, s_span) == _bytes(teacher, t_tab, t_span)
        s_specials = (s_tokens.kinds[s0 + 1 : s1 + 1] != TEXT).sum()
        assert s_specials == (t_tokens.kinds[t0 + 1 : t1 + 1] != TEXT).sum()
    return spans


@pytest.mark.parametrize("seed", range(12))
def test_aligned_pairs_have_seen_the_same_bytes(two_tokenizers, seed):
    """Two byte-level BPEs (300 tokens; 700 with digits split), each as student and teacher."""
    for student, teacher in (two_tokenizers, two_tokenizers[::-1]):
        check_alignment(student, teacher, seed)


@pytest.mark.parametrize("seed", range(12))
def test_bpe_and_unigram_align_on_the_same_bytes(bpe_and_unigram, seed):
    """A byte-level BPE and a unigram LM tokenizer (SentencePiece style: '▁' pieces, byte
    fallback for unseen characters, which cuts emoji and Han into <0xNN> pieces)."""
    for student, teacher in (bpe_and_unigram, bpe_and_unigram[::-1]):
        check_alignment(student, teacher, seed)


def test_the_unigram_tokenizer_round_trips_and_falls_back_to_bytes(bpe_and_unigram):
    uni = bpe_and_unigram[1]
    assert uni.backend_tokenizer.model.__class__.__name__ == "Unigram"
    for text in random_texts(50, 11):
        assert decode_problem(uni, text) is None
    spans = np.concatenate([check_alignment(*bpe_and_unigram, seed) for seed in range(4)])
    assert ((spans[:, 1] - spans[:, 0] > 1) & (spans[:, 3] - spans[:, 2] > 1)).any()
    ids = uni("a  b 🎉x", add_special_tokens=False)["input_ids"]
    assert [uni.convert_ids_to_tokens(i) for i in ids] == [
        "a", "▁", "▁", "b", "▁", "<0xF0>", "<0x9F>", "<0x8E>", "<0x89>", "x"
    ]  # fmt: skip


def test_one_tokenizer_aligns_as_the_identity(two_tokenizers):
    """The same tokenizer re-reading whole documents gives back the student's ids, and every
    position aligns with itself: exact unless its next token ends inside a character."""
    tok = two_tokenizers[0]
    text, ids, ends = student_window(tok, random_texts(3, 5), random.Random(0), cut=0)
    retok = Retokenizer(tok, None, tok.eos_token_id)
    s = retok.student_tokens(ids, ends)
    t_ids, t = retok.window(text, s)
    assert t_ids.tolist() == ids.tolist()
    a = align(s, t)
    inside = (s.kinds == TEXT) & (s.ends == np.concatenate([[0], s.ends[:-1]]))
    assert a.student_pos.tolist() == [i for i in range(len(ids) - 1) if not inside[i]]
    assert (a.student_pos == a.teacher_pos).all()
    assert (a.exact == ~inside[a.student_pos + 1]).all()
    ident = identity_alignment(len(ids))
    assert ident.student_pos.tolist() == list(range(len(ids) - 1)) and ident.exact.all()


def test_specials_align_with_specials():
    s = Tokens(np.array([0, 3, 3, 3, 5]), np.array([BOS, TEXT, EOS, BOS, TEXT], np.int8))
    t = Tokens(np.array([0, 2, 3, 3, 3, 5]), np.array([BOS, TEXT, TEXT, EOS, BOS, TEXT], np.int8))
    a = align(s, t)
    assert a.student_pos.tolist() == [0, 1, 2, 3] and a.teacher_pos.tolist() == [0, 2, 3, 4]
    assert a.exact.tolist() == [False, True, True, True]


def test_shared_vocabulary_maps_equal_strings(two_tokenizers):
    student, teacher = two_tokenizers
    s_ids, t_ids = shared_vocabulary(student, teacher)
    s_tab, t_tab = token_bytes(student), token_bytes(teacher)
    assert len(set(s_ids.tolist())) == len(s_ids) and len(set(t_ids.tolist())) == len(t_ids)
    for a, b in zip(s_ids.tolist(), t_ids.tolist()):
        if a == student.eos_token_id:
            assert b == teacher.eos_token_id
        else:
            assert s_tab[a] == t_tab[b]
    assert len(s_ids) > 200  # all 256 bytes and many merges


def test_decode_problem_names_the_first_changed_character(two_tokenizers, tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    assert decode_problem(two_tokenizers[0], "héllo  wörld\n\tx") is None
    lossy = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    lossy.normalizer = normalizers.Lowercase()
    lossy.pre_tokenizer = pre_tokenizers.Whitespace()
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=lossy, unk_token="[UNK]", eos_token="[UNK]")
    assert decode_problem(fast, "a  b") == 2  # the whitespace run collapses
    assert decode_problem(fast, "B a") == 0  # lowercased
