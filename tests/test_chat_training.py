"""Chat data in training: packed conversations do not see each other, the loss counts the mask's
targets only, and an all-ones mask trains exactly like raw text on the same tokens."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from ddk.commands.cache_teacher import build_cache
from ddk.commands.eval_model import evaluate_model_cli
from ddk.config import PrepareSection
from ddk.data.dataset import PreparedData
from ddk.data.packing import MASK_SUFFIX, TARGET
from ddk.data.prepare import prepare
from ddk.demo.build import tiny_causal_lm
from ddk.evaluate import domain_perplexities
from ddk.logits import hidden_and_head
from ddk.losses import IGNORE_INDEX
from ddk.metrics import read_metrics
from ddk.run_dir import start_run
from ddk.trainer import Trainer
from tests.conftest import make_config
from tests.data.test_chat import chat_tokenizer, write_chat_corpus  # noqa: F401 (fixture)
from tests.test_sharding import _assert_same_run, _config, _env, _torchrun, needs_torchrun

CHAT_INFO = {
    "template_sha256": "0" * 64,
    "template_source": "test",
    "spans_from": "prefix",
    "train_on": "all",
    "packing": "isolated",
    "pad_token_id": 0,
}


def masked_copy(prepared: Path, dest: Path, mask_for) -> Path:
    """`prepared` (raw text) as chat data whose mask bytes are `mask_for(split, n_tokens)`."""
    shutil.copytree(prepared, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for info in manifest["domains"].values():
        for split in ("train", "val", "test"):
            if info.get(f"{split}_tokens") is not None:
                path = dest / info["folder"] / f"{split}{MASK_SUFFIX}"
                mask_for(split, info[f"{split}_tokens"]).astype(np.uint8).tofile(path)
    manifest.update(format_version=4, chat=CHAT_INFO)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


@pytest.fixture(scope="module")
def packed_chat(tmp_path_factory, chat_tokenizer):  # noqa: F811
    root = tmp_path_factory.mktemp("packed")
    write_chat_corpus(root / "corpus", per_domain=40)
    cfg = PrepareSection(
        input=str(root / "corpus"), output=str(root / "data"), seq_len=128, val_sequences=2
    )
    prepare(cfg, str(chat_tokenizer), progress=False)
    return root / "data"


def test_packed_conversation_logits_equal_alone(packed_chat, chat_tokenizer):  # noqa: F811
    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    model = tiny_causal_lm(len(tok), seed=3).eval()  # a Llama from its config, sdpa attention
    shard = PreparedData(packed_chat).domains["math"]
    inputs, _, positions = shard.train_batch(range(shard.num_train_sequences))
    row = int(torch.argmax((positions == 0).sum(1)))  # the row holding the most sequences
    x, pos = inputs[row : row + 1], positions[row : row + 1]
    starts = torch.nonzero(pos[0] == 0).flatten().tolist() + [x.shape[1]]
    assert len(starts) >= 3, "no row packs two conversations"
    with torch.no_grad():
        hidden, head = hidden_and_head(model, x, pos)
        packed = head(hidden)[0]
        unmasked = head(hidden_and_head(model, x)[0])[0]
        for a, b in zip(starts[:-1], starts[1:]):
            alone = head(hidden_and_head(model, x[:, a:b])[0])[0]
            torch.testing.assert_close(packed[a:b], alone, rtol=1e-5, atol=1e-5)
    a, b = starts[1], starts[2]  # without position ids the second sequence sees the first
    assert not torch.allclose(unmasked[a:b], packed[a:b], atol=1e-3)


@pytest.mark.slow
def test_all_ones_mask_trains_like_raw_text(tmp_path, teacher_dir, student_dir, prepared_dir):
    chat = masked_copy(prepared_dir, tmp_path / "chat", lambda _, n: np.full(n, TARGET))
    runs = []
    for name, data in (("raw", prepared_dir), ("chat", chat)):
        cfg = make_config(tmp_path / name, teacher_dir, student_dir, data,
                          **{"distill.method": "kd"})  # fmt: skip
        trainer = Trainer(cfg, tmp_path / name)
        trainer.begin_interval()
        logs = [trainer.train_step() for _ in range(3)]
        ppl = trainer.evaluate_student()
        runs.append(
            (logs, ppl, {n: p.detach().clone() for n, p in trainer.student.named_parameters()})
        )
    (raw_logs, raw_ppl, raw_w), (chat_logs, chat_ppl, chat_w) = runs
    for a, b in zip(raw_logs, chat_logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-6)
    for d in raw_ppl:
        assert chat_ppl[d]["ppl"] == pytest.approx(raw_ppl[d]["ppl"], rel=1e-6)
    for n in raw_w:
        torch.testing.assert_close(chat_w[n], raw_w[n], rtol=1e-5, atol=1e-7)


def test_loss_and_perplexity_count_masked_targets_only(tmp_path, student_dir, prepared_dir):
    rng = np.random.default_rng(0)
    chat = masked_copy(prepared_dir, tmp_path / "chat", lambda _, n: rng.random(n) < 0.3)
    data = PreparedData(chat)
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(student_dir).eval()
    ppl = domain_perplexities(model, data, vocab_size=data.vocab_size, split="val")
    for name, shard in data.domains.items():
        x, y = shard.heldout_batch("val", range(shard.num_val_sequences))
        raw_x, raw_y = (
            PreparedData(prepared_dir)
            .domains[name]
            .heldout_batch("val", range(shard.num_val_sequences))
        )
        kept = y != IGNORE_INDEX
        assert torch.equal(x, raw_x) and torch.equal(y[kept], raw_y[kept])
        assert 0 < kept.sum() < (raw_y != IGNORE_INDEX).sum()
        with torch.no_grad():
            logits = model(x).logits.float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        assert ppl[name]["tokens"] == int(kept.sum())
        assert ppl[name]["loss"] == pytest.approx(float(ce) / int(kept.sum()), rel=1e-5)


def _save_chat_model(path: Path, tokenizer: Path, **kwargs) -> Path:
    tok = AutoTokenizer.from_pretrained(tokenizer)
    tiny_causal_lm(len(tok), **kwargs).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
def test_offline_cache_of_packed_chat_trains_like_online(
    tmp_path,
    packed_chat,
    chat_tokenizer,  # noqa: F811
):
    """The cache stores every position of a packed row, computed with the rows' position ids:
    at k = vocabulary size the offline run's masked loss matches the online run's."""
    teacher = _save_chat_model(tmp_path / "t", chat_tokenizer, hidden_size=48, seed=1)
    student = _save_chat_model(tmp_path / "s", chat_tokenizer, hidden_size=32, num_heads=2)
    vocab = PreparedData(packed_chat).vocab_size
    extra = {
        "distill.method": "kd", "trainer.max_steps": 3, "trainer.log_every": 1,
        "teacher.cache": str(tmp_path / "cache"), "teacher.cache_k": vocab,
        "trainer.micro_batch_size": 2, "trainer.grad_accum_steps": 1,
    }  # fmt: skip
    build_cache(make_config(tmp_path / "c", teacher, student, packed_chat, **extra), False)
    logs = {}
    for mode in ("online", "offline"):
        run = tmp_path / mode
        cfg = make_config(run, teacher, student, packed_chat, **extra, **{"teacher.mode": mode})
        start_run(cfg)
        logs[mode] = [r for r in read_metrics(run / "metrics.jsonl") if "kl" in r]
        final = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "final_eval"]
        assert final[0]["targets"].startswith("chat loss mask")
    assert len(logs["online"]) == len(logs["offline"]) == 3
    for on, off in zip(logs["online"], logs["offline"]):
        assert off["kl"] == pytest.approx(on["kl"], rel=1e-3)
        assert off["loss"] == pytest.approx(on["loss"], rel=1e-3)


def test_ddk_eval_says_it_counts_masked_targets(packed_chat, chat_tokenizer, tmp_path, capsys):  # noqa: F811
    student = _save_chat_model(tmp_path / "s", chat_tokenizer, hidden_size=32, num_heads=2)
    result = evaluate_model_cli(
        str(student), str(packed_chat), domains=None, batch_size=4, max_sequences=None,
        as_json=True,
    )  # fmt: skip
    out = capsys.readouterr().out
    payload = json.loads(out[out.index('{\n  "model"') :])
    assert payload["targets"] == "chat loss mask (prepare.train_on=assistant)"
    manifest = json.loads((packed_chat / "manifest.json").read_text())
    for name, info in manifest["domains"].items():
        assert result[name]["tokens"] == info["test_target_tokens"]


@pytest.mark.slow
@needs_torchrun
def test_chat_ddp_two_processes_match_one(tmp_path, packed_chat, chat_tokenizer):  # noqa: F811
    """Rows of chat data hold different numbers of targets, so a rank that divided by its own
    count would not match: the step divides by the global count, as one process does."""
    teacher = _save_chat_model(tmp_path / "t", chat_tokenizer, hidden_size=48, seed=1)
    student = _save_chat_model(tmp_path / "s", chat_tokenizer, hidden_size=32, num_heads=2)
    one = _config(tmp_path / "one.yaml", tmp_path / "one", teacher, student, packed_chat, 4, 2)
    subprocess.run(
        [sys.executable, "-m", "ddk.cli", "distill", str(one)],
        check=True, env=_env(), capture_output=True,
    )  # fmt: skip
    two = _config(tmp_path / "two.yaml", tmp_path / "two", teacher, student, packed_chat, 2, 2)
    _torchrun(["distill", str(two)], _env())
    _assert_same_run(tmp_path / "one", tmp_path / "two")
