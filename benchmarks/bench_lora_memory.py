"""Memory of a LoRA student against full fine-tuning: the training state (weights, gradients,
AdamW moments) computed for real model shapes, and measured on a small real model.

    python benchmarks/bench_lora_memory.py [--r 16] [--alpha 32] [--targets all-linear]
        [--measure small|tiny] [--out table.md]

Computed: each architecture is built on the meta device (no memory, nothing downloaded),
`ddk.lora.apply_lora` injects the adapters as a run does, and the parameters are counted.
ddk trains the student with fp32 master weights (bf16 comes from autocast), so full
fine-tuning holds 4 B weights + 4 B gradients + 8 B AdamW moments per parameter; a LoRA run
holds the frozen base's 4 B per parameter and the full 16 B only per adapter parameter.

Measured: a randomly initialised Llama takes one real forward, backward and AdamW step (AdamW
over the trainable parameters, as the trainer builds it) in a fresh process per mode; the
table gives the bytes of the tensors then alive (parameters, gradients, AdamW state, counted
by storage) and the process's peak resident memory (ru_maxrss, which also holds the
activations, the interpreter and torch itself). Activations and the teacher are the same in
both modes and not in the computed rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ddk.config import LoraSection
from ddk.lora import apply_lora
from ddk.table import format_table

# Published shapes (config.json of each model on the hub), rebuilt here so nothing downloads.
SHAPES = {
    "Qwen1.5-1.8B (paper's student)": (
        Qwen2ForCausalLM,
        Qwen2Config(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=5504,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=16,
            tie_word_embeddings=False,
        ),
    ),
    "TinyLlama-1.1B": (
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
    ),
}
MEASURED = {  # Llama shapes small enough for one CPU step
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, vocab_size=8192),
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, vocab_size=512),
}
GB = 1e9


def _lora(args) -> LoraSection:
    targets = "all-linear" if args.targets == ["all-linear"] else args.targets
    return LoraSection(r=args.r, alpha=args.alpha, target_modules=targets)


def counts(model_cls, config, lora: LoraSection) -> tuple[int, int]:
    """(all parameters, adapter parameters) of `config` with `lora` applied, on meta."""
    with torch.device("meta"):
        model = model_cls(config)
    base = sum(p.numel() for p in model.parameters())
    apply_lora(model, lora, backend="ddp")
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return base, adapters


def state_bytes(base: int, adapters: int, lora: bool) -> dict[str, int]:
    """fp32 weights, gradients and AdamW moments (exp_avg, exp_avg_sq) of a run."""
    trained = adapters if lora else base
    return {
        "weights": 4 * (base + adapters if lora else base),
        "grads": 4 * trained,
        "adamw": 8 * trained,
    }


def computed_rows(lora: LoraSection) -> list[list]:
    rows = []
    for name, (model_cls, config) in SHAPES.items():
        base, adapters = counts(model_cls, config, lora)
        for mode in ("full", "lora"):
            b = state_bytes(base, adapters, mode == "lora")
            trained = adapters if mode == "lora" else base
            rows.append(
                [name, mode, f"{trained / 1e6:,.1f}M of {base / 1e6:,.1f}M"]
                + [round(v / GB, 2) for v in b.values()]
                + [round(sum(b.values()) / GB, 2)]
            )
    return rows


def _live_state_bytes(model, optimizer) -> dict[str, int]:
    def total(tensors):
        seen = {}
        for t in tensors:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    params = list(model.parameters())
    return {
        "weights": total(params),
        "grads": total(p.grad for p in params if p.grad is not None),
        "adamw": total(v for s in optimizer.state.values() for v in s.values() if v.dim() > 0),
    }


def measure_one(shape: str, mode: str, lora_json: str) -> dict:
    """One real step in this process; what a child process prints for `measured_rows`."""
    torch.manual_seed(0)
    config = LlamaConfig(
        **MEASURED[shape], num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True
    )
    model = LlamaForCausalLM(config)
    if mode == "lora":
        apply_lora(model, LoraSection.model_validate_json(lora_json), backend="ddp")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (2, 128))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    sizes = _live_state_bytes(model, optimizer)
    sizes["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    sizes["trained"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sizes["params"] = sum(p.numel() for p in model.parameters()) - (
        sizes["trained"] if mode == "lora" else 0
    )  # the base model's
    return sizes


def measured_rows(shape: str, lora: LoraSection) -> list[list]:
    rows = []
    for mode in ("full", "lora"):
        done = subprocess.run(
            [sys.executable, __file__, "--child", shape, mode, lora.model_dump_json()],
            capture_output=True,
            text=True,
            check=True,
        )
        m = json.loads(done.stdout.strip().splitlines()[-1])
        state = m["weights"] + m["grads"] + m["adamw"]
        rows.append(
            [
                f"Llama '{shape}' (measured)",
                mode,
                f"{m['trained'] / 1e6:,.2f}M of {m['params'] / 1e6:,.2f}M",
            ]
            + [round(m[k] / 2**20, 3) for k in ("weights", "grads", "adamw")]
            + [round(state / 2**20, 3), round(m["peak_rss"] / 2**20, 1)]
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", nargs="+", default=["all-linear"])
    p.add_argument("--measure", choices=sorted(MEASURED), default="small")
    p.add_argument("--out", help="also write the tables as Markdown here")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure_one(*args.child)))
        return
    lora = _lora(args)
    heads = ["model", "mode", "trained params", "weights", "grads", "AdamW", "total"]
    computed = computed_rows(lora)
    measured = measured_rows(args.measure, lora)
    what = f"LoRA r={lora.r}, alpha={lora.alpha:g}, target_modules={lora.target_modules}"
    tables = [
        (f"Computed training state, GB (10^9 B); {what}", heads, computed),
        (
            "Measured after one real step, MiB (state: tensors alive; peak RSS: the process)",
            [*heads, "peak RSS"],
            measured,
        ),
    ]
    text = "\n\n".join(f"{title}\n{format_table(h, rows)}" for title, h, rows in tables)
    print(text)
    if args.out:
        md = "\n\n".join(
            f"{title}\n\n{format_table(h, rows, markdown=True)}" for title, h, rows in tables
        )
        with open(args.out, "w") as fh:
            fh.write(md + "\n")


if __name__ == "__main__":
    main()
