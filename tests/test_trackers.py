"""Experiment trackers through Accelerate's tracker API (ddk.trackers), each in its offline or
local mode: what they logged equals metrics.jsonl."""

from __future__ import annotations

import json
import struct
import typing
from pathlib import Path

import numpy as np
import pytest

from ddk.cli import main
from ddk.config import Tracker
from ddk.metrics import read_metrics
from ddk.run_dir import start_run
from ddk.trackers import hyperparameters, tracker_values
from tests.test_trainer import make_config


def test_report_to_accepts_what_accelerate_supports():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert set(typing.get_args(Tracker)) == set(LOGGER_TYPE_TO_CLASS)


def test_metric_names():
    update = {
        "event": "domain_update",
        "step": 3,
        "domains": {"code": {"weight": 0.25, "ratio": 2.0, "rows": 4, "teacher_ppl": None}},
    }
    assert tracker_values(update) == {"weight/code": 0.25, "ratio/code": 2.0, "rows/code": 4}
    final = {"event": "final_eval", "step": 9, "split": "test", "domains": {"m": {"ratio": 1.5}}}
    assert tracker_values(final) == {"test/ratio/m": 1.5}
    bench = {
        "event": "benchmark_eval",
        "step": 9,
        "tasks": {"gsm8k": {"score": 0.5, "stderr": 0.1}},
        "domains": {"math": {"score": 0.5}},
        "average": 0.5,
    }
    assert tracker_values(bench) == {
        "benchmark/gsm8k": 0.5,
        "benchmark/gsm8k/stderr": 0.1,
        "benchmark/domain/math": 0.5,
        "benchmark/average": 0.5,
    }
    train = {"step": 2, "loss": 1.5, "lr": 1e-3, "skipped": False, "tokens": 64}
    assert tracker_values(train) == {"train/loss": 1.5, "train/lr": 1e-3, "train/tokens": 64}
    flat = hyperparameters({"distill": {"K": 5, "mixture": {"a": 1.0}}, "eval": {"limit": None}})
    assert flat == {"distill.K": 5, "distill.mixture": '{"a": 1.0}', "eval.limit": "null"}


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its .wandb file (a LevelDB-style log
    of protobuf records: 32 KiB blocks, 7-byte record headers, a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.rglob("*.wandb")
    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, pending = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left  # block trailer / padding
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(pending)
            pending = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows


@pytest.mark.slow
def test_tensorboard_wandb_mlflow_log_the_weights_metrics_jsonl_has(
    tmp_path, teacher_dir, student_dir, prepared_dir, monkeypatch
):
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = tmp_path / "mlruns"  # a local file store (mlflow 3 wants this opt-in for one)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = tmp_path / "run"
    cfg = make_config(
        run,
        teacher_dir,
        student_dir,
        prepared_dir,
        **{"trainer.report_to": "[tensorboard, wandb, mlflow]", "trainer.tracker_project": "t"},
    )
    start_run(cfg)

    records = read_metrics(run / "metrics.jsonl")
    updates = [r for r in records if r.get("event") == "domain_update"]
    domains = list(updates[0]["domains"])
    expected = {(r["step"], d): r["domains"][d]["weight"] for r in updates for d in domains}
    assert len({s for s, _ in expected}) >= 3  # several intervals

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tensorboard = {(e.step, d): e.value for d in domains for e in events.Scalars(f"weight/{d}")}
    assert tensorboard == {k: float(np.float32(v)) for k, v in expected.items()}  # float32 events

    rows = wandb_history(run)
    wandb = {(r["_step"], d): r[f"weight/{d}"] for r in rows for d in domains if f"weight/{d}" in r}
    assert wandb == expected

    client = mlflow.MlflowClient(tracking_uri=store.as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "t"]
    (logged,) = client.search_runs([experiment.experiment_id])
    history = {
        (m.step, d): m.value
        for d in domains
        for m in client.get_metric_history(logged.info.run_id, f"weight/{d}")
    }
    assert history == expected
    assert logged.data.params["distill.K"] == str(cfg.distill.K)  # the resolved config
    assert logged.info.run_name == "run"
    final = [r for r in records if r.get("event") == "final_eval"][-1]
    assert logged.data.metrics[f"test/ratio/{domains[0]}"] == final["domains"][domains[0]]["ratio"]


def test_a_tracker_that_is_missing_or_cannot_start_costs_one_line(
    tmp_path, teacher_dir, student_dir, prepared_dir, monkeypatch, capsys
):
    import importlib.util

    mlflow = pytest.importorskip("mlflow")
    if importlib.util.find_spec("aim") is not None:
        pytest.skip("aim is installed here")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    make_config(
        run,
        teacher_dir,
        student_dir,
        prepared_dir,
        **{
            "trainer.report_to": "[aim, mlflow]",
            "trainer.max_steps": 4,
            # a run id the store does not have: mlflow.start_run refuses it
            "trainer.tracker_kwargs": '{mlflow: {run_id: "0123456789abcdef"}}',
        },
    ).save(cfg)
    assert main(["distill", str(cfg)]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert any("report_to has aim but it is not installed" in w for w in warnings), out
    (failed,) = [w for w in warnings if w.startswith("warning: tracker mlflow could not start")]
    assert "the run continues without it" in failed
    assert (run / "final").is_dir() and mlflow.active_run() is None
