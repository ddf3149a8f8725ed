"""Models whose logits are not hidden @ W.T + b: the load-time probe, the transform inside the
fused loss and evaluation, and the refusal of anything else."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from ddk.data.dataset import PreparedData
from ddk.evaluate import domain_perplexities
from ddk.logits import LogitTransform, logit_transform, transform_from_config
from ddk.losses import fused_distill_loss, naive_distill_loss
from ddk.models import load_model
from ddk.teacher.signals import DenseSignal
from tests.conftest import one_error_line


def _tiny(kind: str, vocab: int):
    from transformers import (
        AutoModelForCausalLM,
        CohereConfig,
        Gemma2Config,
        GraniteConfig,
    )

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    if kind == "granite":
        config = GraniteConfig(**common, logits_scaling=8.0)
    elif kind == "cohere":
        config = CohereConfig(**common, logit_scale=0.25)
    else:  # a small cap so tanh is far from linear on these logits
        config = Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.5)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _save(model, path, tokenizer_dir):
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["granite", "cohere", "gemma2"])
def test_perplexity_equals_the_models_own_loss(kind, tmp_path, tokenizer_dir, prepared_dir):
    data = PreparedData(prepared_dir)
    path = _save(_tiny(kind, data.vocab_size), tmp_path / kind, tokenizer_dir)
    model = load_model(str(path), dtype=torch.float32, what="model")
    assert logit_transform(model) is not None and not logit_transform(model).is_identity
    ours = domain_perplexities(model, data, vocab_size=data.vocab_size, batch_size=3)
    model.eval()
    for name, shard in data.domains.items():
        inputs, labels = shard.heldout_batch("val", range(shard.num_val_sequences))
        # the windows whole again (padding as 0) and HF labels, which the model shifts itself
        ids = torch.cat([inputs[:, :1], labels.clamp_min(0)], dim=1)
        with torch.no_grad():  # the model's own loss: mean CE of its own logits
            own = model(input_ids=ids, labels=torch.cat([inputs[:, :1], labels], 1)).loss.item()
        assert ours[name]["loss"] == pytest.approx(own, rel=1e-5)


def test_granite_transform_is_read_from_the_config():
    from transformers import GraniteConfig

    assert transform_from_config(GraniteConfig(logits_scaling=8)) == LogitTransform(1 / 8)
    assert transform_from_config(GraniteConfig(logits_scaling=1)) is None


def test_plain_model_has_no_transform(student_dir):
    model = load_model(str(student_dir), dtype=torch.float32, what="student")
    assert logit_transform(model) is None


@pytest.mark.parametrize("divergence", ["forward_kl", "js"])
def test_fused_loss_with_transforms_matches_naive(divergence):
    torch.manual_seed(0)
    N, H, V = 37, 16, 50
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V + 3, H, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    labels = torch.randint(0, V, (N,))
    kw = dict(
        vocab_size=V,
        gamma=0.7,
        tau=2.0,
        divergence=divergence,
        student_transform=LogitTransform(0.125),
        teacher_transform=LogitTransform(1.0, softcap=3.0),
    )
    teacher = DenseSignal(th, tw)
    fused = fused_distill_loss(h, w, labels, teacher, chunk_tokens=8, **kw)
    gf = torch.autograd.grad(fused.total, (h, w))
    naive = naive_distill_loss(h, w, labels, teacher, **kw)
    gn = torch.autograd.grad(naive.total, (h, w))
    plain = naive_distill_loss(h, w, labels, teacher, vocab_size=V, gamma=0.7, tau=2.0,
                               divergence=divergence)  # fmt: skip
    assert fused.total.item() == pytest.approx(naive.total.item(), rel=1e-10)
    assert abs(plain.total.item() - naive.total.item()) > 1e-3  # the transform matters here
    for a, b in zip(gf, gn):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.slow  # a subprocess
def test_unsupported_logit_transform_is_refused_with_one_line(
    tmp_path, tokenizer_dir, prepared_dir
):
    """Dory's LM head multiplies each token's logit by its own learned scale: not a scalar."""
    from transformers import AutoModelForCausalLM
    from transformers.models.dory.configuration_dory import DoryConfig

    vocab = PreparedData(prepared_dir).vocab_size
    config = DoryConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        n_input_layers=1,
        n_output_layers=1,
        sliding_window=16,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a trained Dory: per-token scales no longer all equal
        model.lm_head.logit_scale.mul_(torch.rand(vocab) * 2 + 0.5)
    path = _save(model, tmp_path / "dory", tokenizer_dir)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddk.cli",
            "eval",
            "--model",
            str(path),
            "--data",
            str(prepared_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "max difference" in line and str(path) in line and "Dory" in line


@pytest.mark.slow  # a subprocess per split
@pytest.mark.parametrize("data, split", [("prepared_dir", "test"), ("format1_prepared_dir", "val")])
def test_eval_reports_split_and_falls_back_to_val(student_dir, data, split, request):
    proc = subprocess.run(
        [sys.executable, "-m", "ddk.cli", "eval", "--model", str(student_dir), "--data",
         str(request.getfixturevalue(data)), "--json"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["split"] == split
    assert ("no test split" in proc.stderr) == (split == "val")
    assert all(math.isfinite(d["ppl"]) for d in out["domains"].values())
