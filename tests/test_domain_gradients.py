"""benchmarks/domain_gradients.py: the DoGE-style alignment score against its definition, the
emphasis read from a run's domain updates, and (on a real tiny model) gradients per domain."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ddk.errors import DDKError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "domain_gradients.py"
_spec = importlib.util.spec_from_file_location("domain_gradients", SCRIPT)
grads = sys.modules.setdefault("domain_gradients", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(grads)


def test_alignment_score_is_the_projection_on_the_emphasised_gradient():
    rng = np.random.default_rng(3)
    g = rng.normal(size=(4, 50))
    c = rng.dirichlet(np.ones(4))
    u = c @ g
    np.testing.assert_allclose(grads.alignment_scores(g @ g.T, c), g @ u / (u @ u), rtol=1e-12)
    # orthogonal gradients: the score is c_j |g_j|^2 / <u, u>, the norm decides
    ortho = np.diag([1.0, 2.0, 3.0])
    c = np.array([0.5, 0.25, 0.25])
    uu = float(c @ (ortho @ ortho.T) @ c)
    np.testing.assert_allclose(
        grads.alignment_scores(ortho @ ortho.T, c), c * np.diag(ortho) ** 2 / uu
    )


def test_emphasis_from_a_domain_update_and_its_errors(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    update = {"event": "domain_update", "domains": {"a": {"ratio": 4.0}, "b": {"ratio": 1.0}}}
    (run / "metrics.jsonl").write_text(json.dumps(update) + "\n{cut short\n")
    np.testing.assert_allclose(grads.emphasis_of(run, ["a", "b"], -1), [2 / 3, 1 / 3])
    with pytest.raises(DDKError, match="1 domain updates; --update 5"):
        grads.emphasis_of(run, ["a", "b"], 5)
    with pytest.raises(DDKError, match="no teacher ratio"):
        grads.emphasis_of(run, ["a", "c"], 0)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(DDKError, match="no domain updates"):
        grads.emphasis_of(run, ["a"], 0)


def test_one_gradient_per_domain_of_a_real_tiny_model(prepared_dir, student_dir, capsys):
    from ddk.data.dataset import PreparedData
    from ddk.models import eval_model

    data = PreparedData(prepared_dir)
    model = eval_model(str(student_dir), device="cpu")
    g = grads.domain_gradients(model, data)
    params = sum(p.numel() for p in model.parameters())
    assert g.shape == (len(data.names), params) and bool((g.norm(dim=1) > 0).all())
    assert grads.main(["--data", str(prepared_dir), "--model", str(student_dir)]) == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in data.names) and "cosines between domains" in shown
