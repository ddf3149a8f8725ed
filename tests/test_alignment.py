"""Byte alignment of two real tokenizers (`ddk.teacher.alignment`, `ddk.teacher.retokenize`):
property tests over random texts with multi-byte UTF-8, code and whitespace runs."""

from __future__ import annotations

import random

import numpy as np
import pytest
from transformers import AutoTokenizer

from ddk.data.offsets import encode_with_ends, offsets_tokenizer
from ddk.demo.build import train_bpe_tokenizer
from ddk.teacher.alignment import BOS, EOS, TEXT, Tokens, align, identity_alignment
from ddk.teacher.retokenize import Retokenizer, decode_problem, shared_vocabulary, token_bytes
from tests.data.test_offsets import random_texts


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """Two genuinely different byte-level BPEs: 300 tokens, and 700 with digits split."""
    texts = random_texts(400, 7)
    small = train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("small"))
    large = train_bpe_tokenizer(texts, 700, tmp_path_factory.mktemp("large"), split_digits=True)
    return AutoTokenizer.from_pretrained(small), AutoTokenizer.from_pretrained(large)


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


@pytest.mark.parametrize("seed", range(12))
def test_aligned_pairs_have_seen_the_same_bytes(two_tokenizers, seed):
    rng = random.Random(seed)
    for student, teacher in (two_tokenizers, two_tokenizers[::-1]):
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
            assert (s_tokens.kinds[: i + 1] != TEXT).sum() == (
                t_tokens.kinds[: k + 1] != TEXT
            ).sum()
            if exact:  # and the same next token's bytes (or the same special)
                assert s_tokens.kinds[i + 1] == t_tokens.kinds[k + 1]
                assert s_tab.get(int(s_ids[i + 1]), b"") == t_tab.get(int(t_ids[k + 1]), b"")
        assert a.exact.any() and not a.exact.all()  # different tokenizers: both kinds occur


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
