"""examples/paper/: the paper's recipe validates against the schema, its methods differ only in
the method, and its benchmarks are lm-eval tasks under the paper's domains."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ddk.config import load_config
from ddk.methods import METHODS
from ddk.run_dir import flatten

PAPER = Path(__file__).parents[1] / "examples" / "paper"
RECIPE = yaml.safe_load((PAPER / "paper.yaml").read_text())
METHOD_FILES = sorted(p for p in PAPER.glob("*.yaml") if p.stem in METHODS)


def test_every_method_has_a_config():
    assert [p.stem for p in METHOD_FILES] == sorted(METHODS)


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: p.stem)
def test_method_config_is_the_papers_setting(path):
    cfg = load_config(path)
    assert cfg.distill.method == path.stem
    assert (cfg.distill.K, cfg.distill.alpha, cfg.distill.gamma, cfg.distill.tau) == (
        1000,
        0.5,
        0.2,
        1.0,
    )
    assert (cfg.trainer.lr, cfg.trainer.min_lr, cfg.trainer.warmup_steps) == (3e-5, 3e-6, 1000)
    assert cfg.teacher.mode == "offline" and cfg.teacher.cache
    assert cfg.eval.tasks == RECIPE["benchmarks"]
    assert set(cfg.eval.tasks) <= set(RECIPE["domains"])
    tokens = cfg.trainer.max_steps * cfg.trainer.micro_batch_size * cfg.trainer.grad_accum_steps
    assert 14e9 < tokens * 8 * 2048 < 17e9  # 8 GPUs, 2,048-token sequences: about 15B tokens


def test_methods_differ_only_in_method_and_folder():
    configs = [flatten(load_config(p).model_dump(mode="json")) for p in METHOD_FILES]
    differing = {k for c in configs for k in c if c[k] != configs[0][k]}
    assert differing == {"distill.method", "trainer.output_dir"}


def test_prepare_config():
    cfg = load_config(PAPER / "prepare.yaml").prepare
    assert (cfg.seq_len, cfg.val_sequences) == (2048, 500)  # the paper's 500 per domain
    assert cfg.tokenizer == load_config(PAPER / "ddk.yaml").model.student


def test_benchmarks_are_lm_eval_tasks():
    pytest.importorskip("lm_eval")
    from ddk.harness import task_manager

    names = {t for tasks in RECIPE["benchmarks"].values() for t in tasks}
    assert len(names) == 10  # Table 1's ten
    local = task_manager((str(PAPER / "tasks"),), False).all_tasks
    assert local == ["cmath"]
    builtin = task_manager((), True).all_tasks
    assert names - {"cmath"} <= set(builtin)
