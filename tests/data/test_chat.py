"""Chat data: assistant masks from ChatML and LLaMA-3-style templates, `ddk prepare` of
conversations (mask files, whole held-out conversations, packing) and its one-line refusals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from ddk.cli import main
from ddk.config import PrepareSection
from ddk.data.chat import ChatRenderer, record_messages
from ddk.data.dataset import PreparedData
from ddk.data.packing import START, TARGET, pack_rows, position_ids
from ddk.data.prepare import prepare
from ddk.errors import DDKError
from ddk.losses import IGNORE_INDEX
from tests.conftest import one_error_line, tree_digest

CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ m.content }}<|im_end|>{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
    "\n\n{{ m.content | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# A template whose text for a prefix of the conversation is not a prefix of the whole: it
# numbers turns from the end.
UNSTABLE = (
    "{% for m in messages %}[{{ messages|length - loop.index }}]{{ m.role }}: {{ m.content }}\n"
    "{% endfor %}{% if add_generation_prompt %}[0]assistant: {% endif %}"
)
END = {CHATML_GENERATION: "<|im_end|>", CHATML: "<|im_end|>", LLAMA3: "<|eot_id|>"}
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = [
    "the",
    "sum",
    "of",
    "two",
    "and",
    "three",
    "is",
    "five",
    "code",
    "runs",
    "a",
    "loop",
    "over",
    "each",
    "record",
    "key",
]


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer_dir, tmp_path_factory) -> Path:
    """The test tokenizer with chat special tokens and the ChatML template, saved."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("chat_tok")
    tok.save_pretrained(out)
    return out


def conversation(rng: random.Random, turns: int, domain: str = "") -> list[dict]:
    msgs = [{"role": "system", "content": "answer briefly"}] if rng.random() < 0.5 else []
    for _ in range(turns):
        msgs.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))})
        reply = " ".join([domain] + rng.choices(WORDS, k=rng.randint(1, 7))).strip()
        msgs.append({"role": "assistant", "content": reply})
    return msgs


def assistant_ranges(text: str, messages: list[dict], end: str) -> list[tuple[int, int, int]]:
    """(content start, content end, end-marker end) of each assistant turn, found by search."""
    out, pos = [], 0
    for m in messages:
        at = text.index(m["content"].strip(), pos)
        pos = at + len(m["content"].strip())
        if m["role"] == "assistant":
            out.append((at, pos, text.index(end, pos) + len(end)))
    return out


@pytest.mark.parametrize("template", [CHATML_GENERATION, CHATML, LLAMA3])
def test_assistant_mask_covers_assistant_turns_only(chat_tokenizer, template):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    renderer = ChatRenderer(tok, template)
    assert renderer.uses_generation == (template is CHATML_GENERATION)
    rng = random.Random(0)
    for _ in range(20):
        msgs = conversation(rng, rng.randint(1, 3))
        r = renderer.render(msgs)
        offsets = tok(r.text, add_special_tokens=False, return_offsets_mapping=True)
        assert offsets["input_ids"] == r.ids.tolist()
        turns = assistant_ranges(r.text, msgs, END[template])
        for (start, end), m in zip(offsets["offset_mapping"], r.mask.tolist()):
            inside = any(a <= start and end <= e for a, _, e in turns)
            content = any(a <= start and end <= c for a, c, _ in turns)
            if m:
                assert inside, f"masked-in token {r.text[start:end]!r} outside assistant turns"
            if content and end > start:
                assert m, f"assistant token {r.text[start:end]!r} not masked in"
        assert r.mask.sum() > 0


def test_train_on_last_turn_and_all(chat_tokenizer):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    msgs = conversation(random.Random(1), 3)
    every = ChatRenderer(tok, CHATML, "assistant").render(msgs)
    last = ChatRenderer(tok, CHATML, "last_turn").render(msgs)
    everything = ChatRenderer(tok, CHATML, "all").render(msgs)
    assert 0 < last.mask.sum() < every.mask.sum()
    assert (last.mask <= every.mask).all()
    final_turn = assistant_ranges(every.text, msgs, "<|im_end|>")[-1]
    off = tok(every.text, add_special_tokens=False, return_offsets_mapping=True)
    first_masked = off["offset_mapping"][int(np.flatnonzero(last.mask)[0])]
    assert first_masked[0] >= final_turn[0]
    assert everything.mask[0] == 0 and everything.mask[1:].all()


def test_template_without_stable_prefixes_is_refused(chat_tokenizer):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    with pytest.raises(DDKError, match="cannot find the assistant tokens"):
        ChatRenderer(tok, UNSTABLE).render(conversation(random.Random(2), 2))


def test_pack_rows_and_positions():
    lens = np.array([5, 3, 8, 2, 6, 1])
    rows = pack_rows(lens, 8, "isolated")
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(lens[r].sum() <= 8 for r in rows)
    assert len(rows) == 4  # 8 | 6+2 | 5+3 | 1 (best fit, longest first)
    assert pack_rows(lens, 8, "padded") == [[i] for i in range(6)]
    mask = np.array([[0, 1, START, 0, 1 | TARGET, START, 0, 0]], dtype=np.uint8)
    assert position_ids(mask).tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]


def write_chat_corpus(root: Path, per_domain: int = 60, seed: int = 0) -> dict:
    rng = random.Random(seed)
    records = {}
    for domain in ("math", "code"):
        (root / domain).mkdir(parents=True)
        records[domain] = [
            {"messages": conversation(rng, rng.randint(1, 2), domain)} for _ in range(per_domain)
        ]
        with open(root / domain / "chat.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records[domain])
    return records


@pytest.mark.parametrize("packing", ["isolated", "padded"])
def test_prepare_chat_writes_masks_and_whole_conversations(tmp_path, chat_tokenizer, packing):
    write_chat_corpus(tmp_path / "corpus")
    out = tmp_path / "data"
    cfg = PrepareSection(
        input=str(tmp_path / "corpus"), output=str(out), seq_len=48, val_sequences=4,
        packing=packing,
    )  # fmt: skip
    m = prepare(cfg, str(chat_tokenizer), progress=False)
    assert m["format_version"] == 4 and m["chat"]["packing"] == packing
    assert m["chat"]["spans_from"] == "prefix" and len(m["chat"]["template_sha256"]) == 64
    data = PreparedData(out)
    assert data.masked
    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for name, shard in data.domains.items():
        info = m["domains"][name]
        assert info["val_sequences"] == info["val_documents"] == 4
        n = shard.num_train_sequences
        inputs, labels, positions = shard.train_batch(range(n))
        starts = (positions == 0).sum(1)
        assert (starts >= 1).all() and (packing == "isolated" or (starts <= 2).all())
        assert int((labels != IGNORE_INDEX).sum()) == info["train_target_tokens"]
        trained = labels[labels != IGNORE_INDEX]
        assert (trained == end).sum() > 0  # the end-of-turn marker is learned
        x, y = shard.heldout_batch("val", range(4))
        for row in range(4):  # every held-out window is one whole conversation
            text = tok.decode(x[row][x[row] != 0])
            assert text.count("<|im_start|>user") >= 1
        assert int((y != IGNORE_INDEX).sum()) == info["val_target_tokens"]


def test_chat_format_is_detected(tmp_path, chat_tokenizer):
    write_chat_corpus(tmp_path / "corpus", per_domain=50)
    cfg = PrepareSection(input=str(tmp_path / "corpus"), output=str(tmp_path / "d"), seq_len=48,
                         val_sequences=2)  # fmt: skip
    assert prepare(cfg, str(chat_tokenizer), progress=False)["chat"] is not None


def _prepare_cli(tmp_path, tokenizer, capsys, *extra, corpus="corpus") -> tuple[int, str]:
    """`ddk prepare --format chat` in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = main(
        ["prepare", "--input", str(tmp_path / corpus), "--output", str(tmp_path / "out"),
         "--tokenizer", str(tokenizer), "--seq-len", "160", "--val-sequences", "2",
         "--format", "chat", *extra]
    )  # fmt: skip
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"text": "plain"}, "has no 'messages'"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role 'wizard'"),
    ],
)
def test_bad_records_one_line_nothing_written(tmp_path, chat_tokenizer, capsys, record, expected):
    write_chat_corpus(tmp_path / "corpus", per_domain=20)
    with open(tmp_path / "corpus" / "math" / "chat.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    before = tree_digest(tmp_path)
    code, err = _prepare_cli(tmp_path, chat_tokenizer, capsys)
    assert code == 2 and expected in one_error_line(err)
    assert tree_digest(tmp_path) == before


def test_tokenizer_without_template_and_empty_domain(
    tmp_path, tokenizer_dir, chat_tokenizer, capsys
):
    write_chat_corpus(tmp_path / "corpus", per_domain=20)
    code, err = _prepare_cli(tmp_path, tokenizer_dir, capsys)
    assert code == 2 and "has no chat template" in one_error_line(err)
    with open(tmp_path / "corpus" / "code" / "chat.jsonl", "w") as fh:  # no assistant turns
        fh.write(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    code, err = _prepare_cli(tmp_path, chat_tokenizer, capsys)
    assert code == 2 and "domain 'code' has no conversation" in err.splitlines()[-1]
    assert "skipped 1 conversation" in err and not (tmp_path / "out").exists()
    template = tmp_path / "unstable.jinja"
    template.write_text(UNSTABLE)
    write_chat_corpus(tmp_path / "corpus2", per_domain=20)
    code, err = _prepare_cli(
        tmp_path, chat_tokenizer, capsys, "--chat-template", str(template), corpus="corpus2"
    )
    assert code == 2 and "cannot find the assistant tokens" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_prompt_completion_pair_trains_on_the_completion(chat_tokenizer):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    messages, tools = record_messages({"prompt": "two and three", "completion": "is five"}, "r")
    assert [m["role"] for m in messages] == ["user", "assistant"] and tools is None
    r = ChatRenderer(tok, CHATML).render(messages)
    trained = tok.decode(r.ids[r.mask.astype(bool)])
    assert trained == "is five<|im_end|>"


# Many real templates (Gemma, LLaMA-2) raise on a role they do not take.
NO_SYSTEM = (
    "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
    "{{ raise_exception('roles must be user or assistant, not ' + m.role) }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("generation", [False, True])
def test_template_refusing_a_conversation_is_one_line(tmp_path, chat_tokenizer, capsys, generation):
    write_chat_corpus(tmp_path / "corpus", per_domain=20)
    with open(tmp_path / "corpus" / "math" / "chat.jsonl", "a") as fh:
        fh.write(json.dumps({"messages": [{"role": "system", "content": "be brief"}]}) + "\n")
    template = tmp_path / "no_system.jinja"
    body = (
        NO_SYSTEM.replace(
            "{{ m.content }}<|im_end|>",
            "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}",
        )
        if generation
        else NO_SYSTEM
    )
    template.write_text(body)
    before = tree_digest(tmp_path)
    code, err = _prepare_cli(tmp_path, chat_tokenizer, capsys, "--chat-template", str(template))
    line = one_error_line(err)
    assert code == 2 and "chat.jsonl line" in line and "not system" in line
    assert tree_digest(tmp_path) == before
