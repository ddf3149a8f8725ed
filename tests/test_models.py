"""Model loading and the start-up vocabulary check, through from_pretrained on saved models."""

import ast
from pathlib import Path

import pytest
import torch

import ddk
from ddk.demo.build import train_bpe_tokenizer
from ddk.errors import DDKError
from ddk.models import (
    check_tokenizers_match,
    check_vocab,
    embedding_rows,
    load_model,
    load_teacher,
    load_tokenizer,
    resolve_dtype,
)


def test_teacher_is_frozen_and_auto_dtype_is_fp32_on_cpu(teacher_dir):
    dtype = resolve_dtype("auto", torch.device("cpu"))
    assert dtype == torch.float32
    teacher = load_teacher(str(teacher_dir), dtype=dtype)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert next(teacher.parameters()).dtype == torch.float32


def test_identical_vocabularies_pass(teacher_dir, student_dir, tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    check_tokenizers_match(
        load_tokenizer(str(teacher_dir)), load_tokenizer(str(student_dir)), "t", "s"
    )
    t = load_model(str(teacher_dir), dtype=torch.float32, what="teacher")
    s = load_model(str(student_dir), dtype=torch.float32, what="student")
    shared = check_vocab(len(tok), embedding_rows(t), embedding_rows(s))
    assert shared.size == len(tok)


def test_padded_embedding_passes_and_trims(tmp_path, tokenizer_dir, save_model):
    from ddk.losses import chunked_ce_sum

    tok = load_tokenizer(str(tokenizer_dir))
    padded = save_model(
        tmp_path / "padded", tokenizer_dir, padded_vocab=len(tok) + 64, arch="qwen2"
    )
    model = load_model(str(padded), dtype=torch.float32, what="teacher")
    assert embedding_rows(model) == len(tok) + 64
    shared = check_vocab(len(tok), embedding_rows(model), len(tok))
    assert shared.size == len(tok)
    # Logits over the padded rows are ignored: making them huge changes nothing.
    ids = torch.randint(0, len(tok), (1, 9))
    hidden = model.base_model(input_ids=ids[:, :-1]).last_hidden_state[0]
    weight = model.get_output_embeddings().weight.detach().clone()
    before, _ = chunked_ce_sum(hidden, weight, ids[0, 1:], vocab_size=len(tok))
    weight[len(tok) :] = 1e4
    after, _ = chunked_ce_sum(hidden, weight, ids[0, 1:], vocab_size=len(tok))
    assert torch.allclose(before, after)


def test_real_mismatch_names_both_sizes(tmp_path, corpus, teacher_dir):
    with pytest.raises(DDKError, match="tokenizer has 500 tokens.*student's output layer has 400"):
        check_vocab(500, 600, 400)
    other = train_bpe_tokenizer(["completely different text " * 50] * 20, 300, tmp_path / "other")
    with pytest.raises(DDKError, match="vocabulary mismatch") as err:
        check_tokenizers_match(
            load_tokenizer(str(teacher_dir)), load_tokenizer(str(other)), "T", "S"
        )
    assert "T" in str(err.value) and "S" in str(err.value)


def test_missing_local_model_path():
    with pytest.raises(DDKError, match="student path './missing/model' does not exist"):
        load_model("./missing/model", dtype=torch.float32, what="student")


def _pretrained_calls(source: str):
    """The `....from_pretrained(...)` calls in `source`, as ast nodes."""
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "from_pretrained"
        ):
            yield node


def test_every_model_or_tokenizer_load_passes_trust_remote_code():
    """transformers asks on stdin before running a model's own code when trust_remote_code is
    not passed (`echo y |` would then run it whatever the config says): every load in ddk
    passes the setting explicitly."""
    package = Path(ddk.__file__).parent
    loads, missing = 0, []
    for path in sorted(package.rglob("*.py")):
        for call in _pretrained_calls(path.read_text()):
            loads += 1
            if not any(k.arg == "trust_remote_code" for k in call.keywords):
                missing.append(f"{path.relative_to(package)}:{call.lineno}")
    assert loads >= 5 and missing == []
