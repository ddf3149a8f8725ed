"""The interval plan on its own: weights from perplexities, each rank's rows of a step, the
plan's state, and the launches it refuses to continue."""

import numpy as np
import pytest

from ddk.config import load_config
from ddk.curriculum import IntervalPlan
from ddk.data.dataset import PreparedData
from ddk.domains import initial_weights


def _plan(prepared_dir, world=2, **overrides):
    items = {
        "trainer.micro_batch_size": 2,
        "trainer.grad_accum_steps": 3,
        "trainer.max_steps": 10,
        "distill.K": 4,
        **overrides,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in items.items()])
    return IntervalPlan(cfg, PreparedData(prepared_dir), world)


STUDENT = {"code": 30.0, "math": 12.0, "prose": 90.0}
TEACHER = {"code": 10.0, "math": 11.0, "prose": 20.0}


def test_an_interval_draws_eq1_weights_and_every_rank_its_slice(prepared_dir):
    plan = _plan(prepared_dir)
    assert plan.due(0) and not plan.started
    weights = plan.begin_interval(STUDENT, TEACHER)
    names = plan.domains
    expected = initial_weights([STUDENT[d] for d in names], [TEACHER[d] for d in names])
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    assert plan.global_batch == 2 * 3 * 2 and len(plan.plan) == 4 * plan.global_batch
    for step in range(4):
        per_rank = [plan.rows(step, rank) for rank in range(2)]
        assert all(r.shape == (3, 2, 2) for r in per_rank)  # accumulation x micro-batch x row
        # the ranks together read exactly the step's global rows
        both = np.concatenate([r.reshape(-1, 2) for r in per_rank])
        step_rows = plan.plan[step * 12 : (step + 1) * 12]
        assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, step_rows.tolist()))
    assert not plan.due(3) and plan.due(4)
    assert sum(plan.rows_per_domain()) == len(plan.plan)


def test_prior_power_leans_eq1_toward_the_training_token_shares(prepared_dir):
    """distill.prior_power reads each domain's training tokens from the prepared data."""
    plan = _plan(prepared_dir, **{"distill.prior_power": 1.0})
    names = plan.domains
    tokens = np.array([PreparedData(prepared_dir).train_tokens()[d] for d in names], float)
    gaps = np.array([STUDENT[d] / TEACHER[d] for d in names])
    expected = tokens * np.exp(gaps) / (tokens * np.exp(gaps)).sum()
    np.testing.assert_allclose(plan.begin_interval(STUDENT, TEACHER), expected, rtol=1e-12)


def test_worst_focus_floors_the_worst_domain_at_its_token_share(prepared_dir):
    """distill.natural_floor reads each domain's training tokens from the prepared data."""
    plan = _plan(prepared_dir, **{"distill.focus": "worst", "distill.natural_floor": 0.5,
                                  "distill.gap": "log_ratio"})  # fmt: skip
    names = plan.domains
    tokens = np.array([PreparedData(prepared_dir).train_tokens()[d] for d in names], float)
    weights = plan.begin_interval(STUDENT, TEACHER)
    worst = names.index("prose")  # ratio 4.5, against code 3 and math 1.09
    m = 4.5 / 3.0
    share = max(m / (m + 2), min(1.0, 1.5 * tokens[worst] / tokens.sum()))
    np.testing.assert_allclose(weights[worst], share, rtol=1e-12)
    np.testing.assert_allclose(np.delete(weights, worst), (1 - share) / 2, rtol=1e-12)


def test_steering_that_is_not_what_was_asked_for_is_warned_about(prepared_dir, capsys):
    _plan(prepared_dir, **{"distill.uniform_intervals": 3})  # 10 steps, K = 4: 3 intervals
    _plan(prepared_dir, **{"distill.focus": "worst"})  # on raw ratios
    said = capsys.readouterr().out
    assert "uniform_intervals 3 covers all 3 intervals" in said
    assert "use distill.gap: log_ratio" in said
    _plan(prepared_dir, **{"distill.uniform_intervals": 2, "distill.focus": "worst",
                           "distill.gap": "log_ratio"})  # fmt: skip
    assert capsys.readouterr().out == ""


def test_the_last_interval_plans_only_the_steps_that_run(prepared_dir):
    plan = _plan(prepared_dir)  # K = 4, 10 steps: intervals of 4, 4, 2 steps
    for _ in range(3):
        plan.begin_interval(STUDENT, TEACHER)
    assert plan.interval == 2 and len(plan.plan) == 2 * plan.global_batch


def test_a_restored_plan_continues_as_the_uninterrupted_one(prepared_dir):
    a, b = _plan(prepared_dir), _plan(prepared_dir)
    a.begin_interval(STUDENT, TEACHER)
    state = a.state_dict()
    b.check_state_dict(state)
    b.load_state_dict(state)
    np.testing.assert_array_equal(b.rows(2, 1), a.rows(2, 1))
    later = {d: p * 0.9 for d, p in STUDENT.items()}
    np.testing.assert_array_equal(
        b.begin_interval(later, TEACHER), a.begin_interval(later, TEACHER)
    )
    np.testing.assert_array_equal(b.plan, a.plan)


def test_another_global_batch_or_K_is_refused_but_another_split_of_it_is_not(prepared_dir):
    state = _plan(prepared_dir, world=2).state_dict()
    # Twice the processes, half the accumulation: the same 12 sequences per step.
    _plan(prepared_dir, world=4, **{"trainer.micro_batch_size": 1}).check_state_dict(state)
    with pytest.raises(ValueError, match="sequences_per_step 12 -> 6"):
        _plan(prepared_dir, world=1).check_state_dict(state)
    with pytest.raises(ValueError, match="K 4 -> 5"):
        _plan(prepared_dir, **{"distill.K": 5}).check_state_dict(state)
