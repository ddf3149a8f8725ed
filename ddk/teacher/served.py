"""The served teacher (`teacher.mode: served`): a running OpenAI-compatible server (vLLM, SGLang)
at `teacher.url` gives each micro-batch's top-k log-probs (`prompt_logprobs`), the same sparse
signal as a top-k cache, through the same loss.

- Requests carry token ids (the prepared rows, L + 1 tokens: prompt_logprobs of tokens 1..L are
  positions 0..L−1), one request per micro-batch.
- The micro-batches of the next steps of the current interval (rows already drawn) are asked for
  ahead, at most `teacher.served.max_in_flight` at once, so the server works while the student
  steps.
- A failed request is retried with backoff (1, 2, 4, ... s); then the run stops with one line and
  its last checkpoint kept (`ddk distill --resume` continues once the server is back).
- At start-up: the server answers, serves the configured model, and returns prompt_logprobs for
  a probe row; its teacher perplexities are checked against model.teacher's (within
  PPL_AGREEMENT) when those are in the shared teacher-perplexity cache (an online run or a
  transformers evaluation of this teacher on this data put them there).
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ddk import identity
from ddk.errors import DDKError
from ddk.identity import Strength
from ddk.models import resolve_dtype
from ddk.teacher.engines.logprobs import sparse_rows
from ddk.teacher.perplexity import HELDOUT, TeacherPPLCache, cache_dir, hash_memo
from ddk.teacher.signals import Batch, SparseSignal

PPL_AGREEMENT = 0.02  # (choice) relative gap between served and cached teacher perplexities


def base_url(url: str) -> str:
    """The server's root: `http://host:port` from that or `.../v1`."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class ServerError(Exception):
    """A request the server answered with an error (4xx: not retried)."""


def post_json(url: str, body: dict | None, timeout: float) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        if 400 <= e.code < 500:
            raise ServerError(f"HTTP {e.code}: {' '.join(detail.split())}") from None
        raise OSError(f"HTTP {e.code}") from None


def with_retries(call: Callable[[], dict], retries: int, backoff: float = 1.0) -> dict:
    """`call()`, retried `retries` times on connection errors and timeouts (not on a 4xx)."""
    for attempt in range(retries + 1):
        try:
            return call()
        except (OSError, ValueError) as e:  # URLError, timeouts, resets, 5xx, a torn reply
            if attempt == retries:
                reason = getattr(e, "reason", None) or e
                raise OSError(f"{type(e).__name__}: {reason}") from None
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


def hf_perplexity_cache(cfg, data, device) -> TeacherPPLCache:
    """The shared cache entry of model.teacher's own perplexities on this data, in the dtype
    model.dtype gives a transformers forward (what online runs and cache-teacher store)."""
    store = cache_dir(cfg.teacher.ppl_cache_dir)
    data_fp = identity.data_fingerprint(
        data.folder, Strength.CONTENT, splits=HELDOUT, memo=hash_memo(cfg)
    )
    dtype = str(resolve_dtype(cfg.model.dtype, torch.device(device)))
    teacher_fp = identity.evaluated_teacher_fingerprint(cfg.model.teacher, dtype, store)
    return TeacherPPLCache(store, data_fp, teacher_fp)


def _entries(position: dict | None) -> list[tuple[int, float, int]]:
    return [(int(t), e["logprob"], e.get("rank") or 0) for t, e in (position or {}).items()]


class ServedTeacher:
    """A `TeacherSource` over a teacher server. `plan` and `step` (the run's IntervalPlan and
    current step) let it ask for the next micro-batches ahead; without them it asks on demand."""

    def __init__(self, cfg, data, runtime, *, plan=None, step: Callable[[], int] | None = None):
        t = cfg.teacher
        self.url = base_url(t.url)
        self.model = t.served.model or cfg.model.teacher
        self.k, self.vocab, self.data, self.device = (
            t.cache_k,
            data.vocab_size,
            data,
            runtime.device,
        )
        self.timeout, self.retries = t.served.timeout_s, t.served.retries
        self.plan, self.step, self.rank = plan, step, runtime.rank
        self.max_steps = cfg.trainer.max_steps
        self.in_flight = t.served.max_in_flight
        self.pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="ddk-teacher")
        self.pending: dict[bytes, Future] = {}
        self.runtime, self.cfg = runtime, cfg
        self.ppl_source: dict[str, str] = {}
        self._ppl: dict[str, dict[str, float]] = {}
        self._check_server()

    # ------------------------------------------------------------------ requests
    def _get_models(self) -> dict:
        return post_json(f"{self.url}/v1/models", None, self.timeout)

    def _completions(self, prompts: list[list[int]], entries: int) -> list[dict]:
        body = {
            "model": self.model,
            "prompt": prompts,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": entries,
        }
        url = f"{self.url}/v1/completions"
        reply = with_retries(lambda: post_json(url, body, self.timeout), self.retries)
        choices = sorted(reply.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts) or any(c.get("prompt_logprobs") is None for c in choices):
            raise ServerError(
                f"the server at {self.url} returned no prompt_logprobs; serve the teacher with "
                "vLLM or SGLang (an OpenAI-compatible server that returns them)"
            )
        return [c["prompt_logprobs"] for c in choices]

    def _stopped(self, e: Exception) -> DDKError:
        if isinstance(e, ServerError):
            return DDKError(f"teacher server {self.url}: {e}")
        return DDKError(
            f"teacher server {self.url} did not answer after {self.retries + 1} tries ({e}); the "
            "last checkpoint is kept: restart the server and run `ddk distill --resume RUN_DIR`"
        )

    def _check_server(self) -> None:
        try:
            models = with_retries(self._get_models, min(self.retries, 1))
        except (OSError, ValueError) as e:
            raise DDKError(
                f"teacher.url: no teacher server answers at {self.url} ({e}); start one "
                "(`ddk serve-teacher CONFIG`) or fix teacher.url"
            ) from None
        except ServerError as e:
            raise DDKError(
                f"teacher.url: {self.url} is not an OpenAI-compatible server ({e})"
            ) from None
        names = [m.get("id") for m in models.get("data", [])] if isinstance(models, dict) else []
        if self.model not in names:
            raise DDKError(
                f"teacher.url: the server at {self.url} serves {names}, not '{self.model}'; serve "
                "the configured teacher there (or set teacher.served.model to its name)"
            )
        # A request is seq_len + 1 prompt tokens plus the 1 generated token the API insists on;
        # a shorter context answers HTTP 400 at the first full row (vLLM and SGLang list max_model_len).
        card = next(m for m in models["data"] if m.get("id") == self.model)
        context, needed = card.get("max_model_len"), self.data.seq_len + 2
        if isinstance(context, int) and context < needed:
            raise DDKError(
                f"teacher.url: the server's max_model_len is {context}, a request needs "
                f"seq_len + 2 = {needed} tokens; prepare the data with seq_len <= {context - 2} "
                "or serve the teacher with a longer context"
            )
        name = self.data.names[0]
        probe = self.data.domains[name].sequences("train", [0])[:, :9].tolist()
        try:
            self._completions(probe, self.k)
        except ServerError as e:
            raise DDKError(f"teacher.url: {e}") from None
        except OSError as e:
            raise self._stopped(e) from None

    # ------------------------------------------------------------------ the signal
    def _fetch(self, rows: np.ndarray) -> SparseSignal:
        prompts = [
            self.data.domains[self.data.names[d]].sequences("train", [j])[0].tolist()
            for d, j in np.asarray(rows).tolist()
        ]
        replies = self._completions(prompts, self.k)
        positions = [_entries(p) for reply in replies for p in reply[1:]]
        return sparse_rows(positions, self.k, self.vocab)

    def _submit(self, rows: np.ndarray) -> None:
        key = np.asarray(rows).tobytes()
        if key not in self.pending:
            self.pending[key] = self.pool.submit(self._fetch, np.asarray(rows))

    def _ask_ahead(self) -> None:
        """Submit the micro-batches of this and the next steps whose rows are drawn, up to
        max_in_flight pending."""
        if self.plan is None or self.step is None:
            return
        step = self.step()
        interval = step // self.plan.K
        for s in range(step, self.max_steps):
            drawn = self.plan.plan is not None and len(self.plan.plan) >= (
                (s % self.plan.K + 1) * self.plan.global_batch
            )
            if s // self.plan.K != interval or not drawn:
                return
            for rows in self.plan.rows(s, self.rank):
                if len(self.pending) >= self.in_flight:
                    return
                self._submit(rows)

    def signal(self, batch: Batch) -> SparseSignal:
        self._ask_ahead()
        key = np.asarray(batch.rows).tobytes()
        self._submit(batch.rows)
        future = self.pending.pop(key)
        try:
            signal = future.result()
        except (OSError, ServerError) as e:
            self.close()
            raise self._stopped(e) from None
        self._ask_ahead()  # the freed slot: the next micro-batch
        return SparseSignal(*(t.to(self.device) for t in signal[:3]))

    # ------------------------------------------------------------------ perplexities
    def perplexities(self, split: str) -> dict[str, float]:
        """{domain: ppl} of the served teacher on held-out `split` (rank 0 asks; broadcast),
        checked against model.teacher's own when the shared cache holds them (the first call,
        for val, comes before step 1)."""
        if split not in self._ppl:
            result = self._heldout(split) if self.runtime.is_main else None
            problem = self._ppl_problem(split, result) if self.runtime.is_main else ""
            result, problem = self.runtime.broadcast_object((result, problem))
            if problem:
                self.close()
                raise DDKError(problem)
            self._ppl[split] = result
            self.ppl_source[split] = "served"
        return self._ppl[split]

    def _ppl_problem(self, split: str, served: dict[str, float]) -> str:
        known = hf_perplexity_cache(self.cfg, self.data, self.device).get(split, self.data.names)
        if known is None:
            return ""
        for domain, value in served.items():
            if abs(value / known[domain]["ppl"] - 1) > PPL_AGREEMENT:
                return (
                    f"teacher.url: the server's teacher perplexity on {split} '{domain}' is "
                    f"{value:.4g}, model.teacher's is {known[domain]['ppl']:.4g}; the server "
                    "serves another model, tokenizer or precision: serve model.teacher there"
                )
        return ""

    def _heldout(self, split: str) -> dict[str, float]:
        out = {}
        for name, shard in self.data.domains.items():
            loss, tokens = 0.0, 0
            inputs, labels = shard.heldout_batch(split, range(shard.num_sequences(split)))
            prompts = []
            for x, y in zip(inputs.tolist(), labels.tolist()):
                n = sum(1 for t in y if t >= 0)
                if n:
                    prompts.append([*x[:n], y[n - 1]])
            for i in range(0, len(prompts), 16):
                chunk = prompts[i : i + 16]
                try:
                    replies = self._completions(chunk, 1)
                except (OSError, ServerError) as e:
                    raise self._stopped(e) from None
                for prompt, reply in zip(chunk, replies):
                    for token, position in zip(prompt[1:], reply[1:]):
                        loss -= position[str(token)]["logprob"]
                        tokens += 1
            out[name] = math.exp(min(loss / max(tokens, 1), 700.0))
        return out

    @property
    def ppl_key(self) -> dict:
        return {"served": self.url, "model": self.model}

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
