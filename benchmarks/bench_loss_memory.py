"""Peak memory and time of the loss, forward + backward: full logits vs chunked.

    python benchmarks/bench_loss_memory.py                      # defaults below
    python benchmarks/bench_loss_memory.py --tokens 8192 --vocab 152064 --divergence js

Defaults: vocab 32,000 and 152,064, H=512; on CUDA N=4096 tokens and fused chunks
of 1024 and 256 tokens, on CPU N=2048 and chunks of 256 (about 1.5 minutes on
two cores; the full-logits case at vocab 152,064 needs about 9 GiB of RAM).

Each case (implementation x chunk size x vocab) runs in a fresh subprocess, after
a tiny warm-up run that loads kernels and libraries, so one case's allocator
state cannot hide or inflate another's.

- CUDA (default when available; bfloat16 inputs): peak = torch.cuda.max_memory_allocated()
  during one forward + backward, minus the memory allocated just before it
  (inputs, after one warm-up run whose .grad buffers are dropped). Time: median of
  --repeats runs.
- CPU (float32 inputs): peak = growth of the process's resident-set high-water
  mark (getrusage ru_maxrss) over one forward + backward, relative to the mark
  right after the inputs are allocated. Inputs are created in place so that no
  temporary raises the mark before it is read; large CPU tensors are mmap'ed and
  returned to the OS when freed, so the mark follows the live tensors. Time: that
  one run (no warm-up: a second run would not show up in the mark).

Both include the .grad buffers of the student hidden states and LM head.
The inputs are random (N tokens, hidden H, student and teacher heads [V, H], 1 %
of the labels ignored); "loss/token" shows that both implementations agree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MiB = 1024 * 1024


def _worker(args: argparse.Namespace) -> dict:
    import torch

    from ddk.losses import fused_distill_loss, naive_distill_loss
    from ddk.teacher.signals import DenseSignal

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab_case

    fn = {"naive": naive_distill_loss, "fused": fused_distill_loss}[args.impl]

    def make_inputs(n, h, v):
        def leaf(*shape, scale):
            return torch.empty(*shape, dtype=dtype, device=device).normal_(0.0, scale)

        labels = torch.randint(0, v, (n,), device=device)
        labels[torch.rand(n, device=device) < 0.01] = -100
        return (
            leaf(n, h, scale=1.0).requires_grad_(True),
            leaf(v, h, scale=h**-0.5).requires_grad_(True),
            labels,
            leaf(n, h, scale=1.0),
            leaf(v, h, scale=h**-0.5),
        )

    def step(hidden, weight, labels, t_hidden, t_weight, v=v):
        out = fn(
            hidden,
            weight,
            labels,
            DenseSignal(t_hidden, t_weight),
            vocab_size=v,
            gamma=0.2,
            tau=1.0,
            divergence=args.divergence,
            chunk_tokens=args.chunk_tokens[0],
        )
        out.total.backward()
        return out

    # A tiny run first loads the kernels and libraries (their pages count in RSS).
    step(*make_inputs(64, h, 1000), v=1000)
    inputs = make_inputs(n, h, v)
    hidden, weight = inputs[:2]
    if device.type == "cuda":
        step(*inputs)  # warm-up at full size (cuBLAS workspaces, allocator)
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for i in range(args.repeats):
            hidden.grad = weight.grad = None
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = step(*inputs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if i == 0:
                peak = torch.cuda.max_memory_allocated() - base
        seconds = statistics.median(times)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        t0 = time.perf_counter()
        out = step(*inputs)
        seconds = time.perf_counter() - t0
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    return {
        "peak_mib": peak / MiB,
        "seconds": seconds,
        "loss_per_token": out.total.item() / out.tokens,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=None, help="N (default: 4096 CUDA, 2048 CPU)")
    p.add_argument("--hidden", type=int, default=512, help="H for student and teacher")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument(
        "--chunk-tokens",
        type=int,
        nargs="+",
        default=None,
        help="fused chunk sizes to compare (default: 1024 256 on CUDA, 256 on CPU)",
    )
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--repeats", type=int, default=3, help="timed runs on CUDA (CPU: 1)")
    p.add_argument("--impls", nargs="+", default=["naive", "fused"])
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_impl", dest="impl", help=argparse.SUPPRESS)
    p.add_argument("--_vocab-case", dest="vocab_case", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        print(json.dumps(_worker(args)))
        return

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.tokens is None:
        args.tokens = 4096 if args.device == "cuda" else 2048
    if args.chunk_tokens is None:
        args.chunk_tokens = [1024, 256] if args.device == "cuda" else [256]
    if args.device == "cpu":
        args.repeats = 1
        where = f"CPU, {torch.get_num_threads()} threads"
        how = "peak = growth of ru_maxrss (RSS high-water mark) over one fwd+bwd"
    else:
        where = torch.cuda.get_device_name()
        how = "peak = torch.cuda.max_memory_allocated() over one fwd+bwd, minus inputs"

    print(
        f"# loss fwd+bwd on {where}, {args.dtype} inputs, N={args.tokens} tokens, "
        f"H={args.hidden}, divergence={args.divergence}; fused/C = chunk_tokens C"
    )
    print(f"# {how}; each case in a fresh subprocess; time = median of {args.repeats} run(s)")
    header = f"{'vocab':>8} {'impl':>11} {'peak MiB':>10} {'time ms':>9} {'loss/token':>11}"
    print(f"{header} {'one fp32 [N,V] MiB':>19}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    cases = [("naive", 0)] if "naive" in args.impls else []
    if "fused" in args.impls:
        cases += [("fused", c) for c in args.chunk_tokens]
    for vocab in args.vocab:
        for impl, chunk in cases:
            name = impl if impl == "naive" else f"fused/{chunk}"
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--_worker",
                f"--_impl={impl}",
                f"--_vocab-case={vocab}",
                f"--tokens={args.tokens}",
                f"--hidden={args.hidden}",
                f"--divergence={args.divergence}",
                f"--chunk-tokens={chunk or 1}",
                f"--device={args.device}",
                f"--dtype={args.dtype}",
                f"--repeats={args.repeats}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{vocab:>8} {name:>11} failed (exit {proc.returncode}): {tail}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            logits_mib = args.tokens * vocab * 4 / MiB
            print(
                f"{vocab:>8} {name:>11} {r['peak_mib']:>10.0f} {r['seconds'] * 1000:>9.1f} "
                f"{r['loss_per_token']:>11.5f} {logits_mib:>19.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
