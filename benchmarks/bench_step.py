"""One optimizer step of distillation, four ways, same models / batch / seed: tokens/s and peak
memory, each also as a ratio to the naive way.

    python benchmarks/bench_step.py --preset tiny      # CPU-sized pair (teacher >= 4x student)
    python benchmarks/bench_step.py --preset qwen      # Qwen2 shapes (~0.5B / ~1.5B), GPU

Rows (each in a fresh subprocess, models built from configs with random weights, seed 0):

- naive: HF forward of both models (full logits), CE + gamma * F.kl_div on full fp32
  log-softmaxes, backward, AdamW step.
- ddk online: the teacher's hidden states + LM head (`OnlineTeacher`) and ddk's fused chunked
  loss (`fused_distill_loss`): no [tokens, vocab] tensor is ever whole.
- ddk offline: the teacher's top-k (k = --k) read from a `ddk cache-teacher` cache shard on disk
  (`OfflineTeacher`: memmap read + host-to-device copy are inside the timing), no teacher
  model in the process; the sparse divergence with the student's LM head fused.
- liger: Liger-Kernel's `LigerFusedLinearJSDLoss` with beta = 0 (forward KL) on the same
  hidden states, when `liger_kernel` is installed (`pip install ddk-distill[liger]`; needs
  triton, i.e. a GPU). Listed as "not installed" otherwise.

Timing: --warmup steps, then the median of --steps timed steps (CUDA synchronised).
Peak memory: CUDA max_memory_allocated over the timed steps (models, optimizer state
included); CPU: the process's RSS high-water mark (ru_maxrss) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    # CPU: a small vocabulary keeps the LM head from dominating; teacher ~4.9x student params.
    "tiny": dict(
        vocab=4096,
        seq_len=256,
        batch=4,
        student=dict(
            hidden_size=128,
            num_hidden_layers=2,
            intermediate_size=512,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        teacher=dict(
            hidden_size=256,
            num_hidden_layers=6,
            intermediate_size=1024,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),  # fmt: skip
    # Qwen2-0.5B and Qwen2-1.5B shapes.
    "qwen": dict(
        vocab=151936,
        seq_len=2048,
        batch=4,
        student=dict(
            hidden_size=896,
            num_hidden_layers=24,
            intermediate_size=4864,
            num_attention_heads=14,
            num_key_value_heads=2,
        ),
        teacher=dict(
            hidden_size=1536,
            num_hidden_layers=28,
            intermediate_size=8960,
            num_attention_heads=12,
            num_key_value_heads=2,
        ),
    ),  # fmt: skip
}
ROWS = ["naive", "online", "offline", "liger"]
GAMMA, TAU = 0.2, 1.0


def _model(shape: dict, vocab: int, seq_len: int, dtype, device, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(
        vocab_size=vocab,
        max_position_embeddings=max(seq_len, 32),
        tie_word_embeddings=True,
        use_cache=False,
        **shape,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _write_cache(folder: Path, teacher, input_ids, vocab: int, k: int, chunk: int) -> None:
    """A one-shard `ddk cache-teacher` cache of this batch, written with the cache's own code."""
    from ddk.teacher import cache_format as c
    from ddk.teacher.online import OnlineTeacher

    signal = OnlineTeacher(teacher).topk(input_ids, vocab=vocab, k=k, tau=TAU, chunk=chunk)
    B, L = input_ids.shape
    manifest = {
        "format_version": c.FORMAT_VERSION,
        "teacher_fingerprint": "bench: random-init teacher",
        "data_fingerprint": "bench: one random batch",
        "vocab_size": vocab,
        "seq_len": L,
        "k": k,
        "tau": TAU,
        "shard_sequences": c.SHARD_SEQUENCES,
        "dtypes": {"ids": c.id_dtype(vocab).name, "logp": "float16", "log_tail": "float32"},
        "bytes_per_token": c.bytes_per_token(k, vocab),
        "samples": 0,  # top-k only: what the bench times
        "complete": True,
        "domains": {"bench": {"folder": "bench", "sequences": B, "shards": 1}},
    }
    c.write_shard(folder / "bench" / "000000.bin", c.shard_arrays(signal, vocab))
    (folder / c.MANIFEST).write_text(json.dumps(manifest))


def _worker(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ddk.logits import hidden_and_head
    from ddk.losses import fused_distill_loss
    from ddk.teacher import Batch
    from ddk.teacher.online import OnlineTeacher

    p = PRESETS[args.preset]
    vocab, T, B = p["vocab"], args.seq_len or p["seq_len"], args.batch or p["batch"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if cuda
        else __import__("contextlib").nullcontext
    )
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (B, T + 1), generator=g).to(device)
    input_ids, labels = input_ids[:, :-1], input_ids[:, 1:]
    # The student trains in fp32 master weights (bf16 autocast on GPU), as `ddk distill` does.
    student = _model(p["student"], vocab, T, torch.float32, device, seed=1)
    if args.grad_ckpt:
        student.gradient_checkpointing_enable()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    info = {"student_params": _params(student)}

    teacher = None
    if args.row == "cache":  # its own process, so the offline row never holds the teacher
        t = _model(p["teacher"], vocab, T, dtype, device, seed=2).eval().requires_grad_(False)
        with torch.no_grad():
            _write_cache(Path(args.cache), t, input_ids, vocab, args.k, args.chunk)
        return {"teacher_params": _params(t)}
    if args.row == "offline":
        from ddk.teacher.offline import OfflineTeacher

        offline = OfflineTeacher(args.cache, ["bench"], device, "topk")
        rows = np.stack([np.zeros(B, dtype=np.int64), np.arange(B)], axis=1)
    else:
        teacher = _model(p["teacher"], vocab, T, dtype, device, seed=2).eval().requires_grad_(False)
        info["teacher_params"] = _params(teacher)

    def ddk_loss(sig):
        with autocast():
            hidden, head = hidden_and_head(student, input_ids)
        return fused_distill_loss(
            hidden.reshape(-1, hidden.shape[-1]), head.weight, labels.reshape(-1), sig,
            vocab_size=vocab, gamma=GAMMA, tau=TAU, divergence="forward_kl",
            chunk_tokens=args.chunk,
        ).total  # fmt: skip

    if args.row == "naive":

        def loss_fn():
            with autocast():
                s_logits = student(input_ids=input_ids).logits.float()
                with torch.no_grad():
                    t_logits = teacher(input_ids=input_ids).logits.float()
            s_logits = s_logits.reshape(-1, s_logits.shape[-1])
            t_logits = t_logits.reshape(-1, t_logits.shape[-1])
            ce = F.cross_entropy(s_logits, labels.reshape(-1), reduction="sum")
            kl = F.kl_div(
                torch.log_softmax(s_logits / TAU, -1),
                torch.log_softmax(t_logits / TAU, -1),
                log_target=True,
                reduction="sum",
            )
            return ce + GAMMA * kl

    elif args.row == "online":
        online = OnlineTeacher(teacher, autocast)

        def loss_fn():
            return ddk_loss(online.signal(Batch(input_ids, None)))

    elif args.row == "offline":

        def loss_fn():
            return ddk_loss(offline.signal(Batch(input_ids, rows)))

    else:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=1.0, weight_soft_loss=GAMMA, beta=0.0, temperature=TAU
        )

        def loss_fn():
            with autocast():
                s_hidden, s_head = hidden_and_head(student, input_ids)
                with torch.no_grad():
                    t_hidden, t_head = hidden_and_head(teacher, input_ids)
                return liger(
                    s_hidden.reshape(-1, s_hidden.shape[-1]),
                    s_head.weight,
                    t_hidden.reshape(-1, t_hidden.shape[-1]),
                    t_head.weight,
                    labels.reshape(-1),
                    None,  # student_bias (positional in Liger's forward)
                    None,  # teacher_bias
                )

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {**info, "tokens_per_s": B * T / seconds, "peak_gib": peak, "loss": loss}


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return (
        f"CPU ({cpu}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS)
    ap.add_argument("--batch", type=int, help="sequences per step (default: the preset's)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    ap.add_argument("--k", type=int, default=64, help="top-k of the offline cache")
    ap.add_argument("--chunk", type=int, default=1024, help="loss chunk tokens (ddk rows)")
    ap.add_argument("--grad-ckpt", action="store_true", help="student gradient checkpointing")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--_row", dest="row", help=argparse.SUPPRESS)
    ap.add_argument("--_cache", dest="cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.out:  # the workers get the same arguments, less --out
        argv = [a for a in (argv or sys.argv[1:]) if not a.startswith("--out") and a != args.out]
    if args.row:
        print(json.dumps(_worker(args)))
        return

    p = PRESETS[args.preset]
    B, T = args.batch or p["batch"], args.seq_len or p["seq_len"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    results = {}
    cache = tempfile.mkdtemp(prefix="ddk-bench-cache-")
    for row in (["cache"] if "offline" in args.rows else []) + args.rows:
        if row == "liger":
            try:
                import liger_kernel  # noqa: F401
            except ImportError:
                results[row] = "not installed"
                continue
        cmd = [
            sys.executable, os.path.abspath(__file__), f"--_row={row}", f"--_cache={cache}",
            *(argv or sys.argv[1:]),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            results[row] = f"failed: {tail[:80]}"
            continue
        results[row] = json.loads(proc.stdout.strip().splitlines()[-1])

    shutil.rmtree(cache, ignore_errors=True)
    first = next((r for r in results.values() if isinstance(r, dict) and "student_params" in r), {})
    cache_info = results.get("cache")
    if isinstance(cache_info, dict):
        first.setdefault("teacher_params", cache_info["teacher_params"])
    lines = [
        f"# bench_step --preset {args.preset}: {_machine()}, load average "
        f"{os.getloadavg()[0]:.1f} at the end",
        f"# batch {B} x {T} tokens, vocab {p['vocab']}, student {first.get('student_params', 0) / 1e6:.2f}M "
        f"params, teacher {first.get('teacher_params', 0) / 1e6:.2f}M params "
        f"({first.get('teacher_params', 0) / max(first.get('student_params', 1), 1):.1f}x), "
        f"offline k={args.k}, grad. checkpointing {'on' if args.grad_ckpt else 'off'}, "
        f"median of {args.steps} steps after {args.warmup} warm-up",
        "",
        "| way | tokens/s | x naive | peak GiB | x naive | loss |",
        "|---|---|---|---|---|---|",
    ]
    base = results.get("naive") if isinstance(results.get("naive"), dict) else None
    names = {"naive": "naive (full logits + F.kl_div)", "online": "ddk online (fused chunked)",
             "offline": f"ddk offline (top-{args.k} cache)", "liger": "Liger fused linear JSD, beta=0"}  # fmt: skip
    for row in args.rows:
        r = results[row]
        if not isinstance(r, dict):
            lines.append(f"| {names[row]} | {r} | | | | |")
            continue
        tps = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        mem = f"{r['peak_gib'] / base['peak_gib']:.2f}" if base else "-"
        lines.append(
            f"| {names[row]} | {r['tokens_per_s']:,.0f} | {tps} | {r['peak_gib']:.2f} | {mem} "
            f"| {r['loss']:.4g} |"
        )
    if isinstance(results.get("offline"), dict) and isinstance(results.get("online"), dict):
        ratio = results["offline"]["tokens_per_s"] / results["online"]["tokens_per_s"]
        lines.append("")
        lines.append(f"offline / online tokens/s: {ratio:.2f}x")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
