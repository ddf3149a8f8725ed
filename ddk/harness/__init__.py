"""Benchmark scores through lm-evaluation-harness (`lm-eval`, `pip install 'ddk-distill[eval]'`).

    plan = BenchmarkPlan.from_section(cfg.eval)   # task -> domain, n-shot, limit, batch size
    problems = plan_problems(plan, domains)       # before any training step; one phrase each
    record = score(model, tokenizer, plan)        # per task: score, stderr, n-shot, version

tasks.py: the plan and its checks; score.py: scoring a model in memory; output.py: the
`ddk eval` table and JSON, and a run's `benchmark_eval` records (RunBenchmarks).
"""

from ddk.harness.output import (
    RunBenchmarks,
    benchmark_model_cli,
    benchmark_rows,
    benchmarks_payload,
    write_benchmarks,
)
from ddk.harness.score import benchmark_record, score, score_or_failure
from ddk.harness.tasks import (
    LM_EVAL_EXTRA,
    BenchmarkPlan,
    check_plan,
    lm_eval_version,
    plan_problems,
    task_manager,
)

__all__ = [
    "LM_EVAL_EXTRA",
    "BenchmarkPlan",
    "RunBenchmarks",
    "benchmark_model_cli",
    "benchmark_record",
    "benchmark_rows",
    "benchmarks_payload",
    "check_plan",
    "lm_eval_version",
    "plan_problems",
    "score",
    "score_or_failure",
    "task_manager",
    "write_benchmarks",
]
