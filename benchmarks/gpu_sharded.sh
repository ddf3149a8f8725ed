#!/usr/bin/env bash
# Prepared GPU check for sharded training (not run on the CPU dev box): a bf16 DDK run with a
# random-initialised Qwen2-shaped ~0.5B student and ~1.5B teacher (configs only, no download)
# under DDP, FSDP2, FSDP2 + a sharded teacher and DeepSpeed ZeRO-3 (when deepspeed is
# installed: pip install 'ddk-distill[deepspeed]'), on all visible GPUs; prints tokens/s and
# rank-0 peak memory per setup as a markdown table. Run from the repository root:
#   OUT=/tmp/bench STEPS=30 bash benchmarks/gpu_sharded.sh
set -uo pipefail
OUT=${OUT:-/tmp/ddk-gpu-sharded}
STEPS=${STEPS:-30}
PY=${PYTHON:-python3}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
mkdir -p "$OUT"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

# 1. Data, tokenizer and the two models (random weights, Qwen2-0.5B / Qwen2-1.5B shapes).
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, Qwen2Config
from ddk.config import PrepareSection
from ddk.data.prepare import prepare
from ddk.demo.build import train_bpe_tokenizer
from ddk.demo.corpus import build_demo_corpus
from ddk.models import load_tokenizer

out = Path(sys.argv[1])
if not (out / "data").exists():
    build_demo_corpus(out / "corpus", scale=1.0)
    texts = (json.loads(l)["text"] for f in sorted((out / "corpus").glob("*/*.jsonl")) for l in f.open())
    train_bpe_tokenizer(texts, 32000, out / "tok")
    prepare(PrepareSection(input=str(out / "corpus"), output=str(out / "data"), seq_len=1024,
                           val_sequences=16), str(out / "tok"), progress=False)
tok = load_tokenizer(str(out / "tok"))
shapes = {  # hidden, intermediate, layers, heads; vocab padded like Qwen (151936 rows)
    "student": (896, 4864, 24, 14),
    "teacher": (1536, 8960, 28, 12),
}
for name, (h, i, n, a) in shapes.items():
    if (out / name / "config.json").exists():
        continue
    cfg = Qwen2Config(vocab_size=151936, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                      num_attention_heads=a, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    print(name, f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
    model.save_pretrained(out / name)
    tok.save_pretrained(out / name)
PY
cat > "$OUT/run.yaml" <<YAML
model: {teacher: $OUT/teacher, student: $OUT/student}
data: {prepared: $OUT/data}
distill: {method: ddk, K: 10}
trainer: {max_steps: $STEPS, micro_batch_size: 4, grad_accum_steps: 1, log_every: 10,
          save_every: 100000, warmup_steps: 5, lr: 3.0e-4, min_lr: 3.0e-5, eval_batch_size: 8}
YAML

# 2. One run per setup.
run() {  # name, accelerate config, teacher placement
  local name=$1 config=$2 placement=$3
  rm -rf "$OUT/runs/$name"
  timeout 900 $PY -m accelerate.commands.launch --config_file "$config" --num_processes "$NGPU" \
    -m ddk.cli distill "$OUT/run.yaml" --set "trainer.output_dir=$OUT/runs/$name" \
    --set "teacher.placement=$placement" > "$OUT/$name.log" 2>&1
  echo "$name exit $?"; grep -E "teacher placement|Error" "$OUT/$name.log" | head -3
}
run ddp examples/accelerate/ddp.yaml replicated
run fsdp2 examples/accelerate/fsdp2.yaml replicated
if [ "$NGPU" -ge 2 ]; then
  run fsdp2_sharded_teacher examples/accelerate/fsdp2.yaml sharded
else
  echo "fsdp2_sharded_teacher skipped: a sharded teacher needs 2+ GPUs (found $NGPU)"
fi
if $PY -c "import deepspeed" 2>/dev/null; then
  run zero3 examples/accelerate/zero3.yaml auto
else
  echo "zero3 skipped: deepspeed is not installed"
fi

# 3. The table: last logged window's tokens/s and rank 0's peak memory.
$PY - "$OUT" "$NGPU" <<'PY' | tee "$OUT/table.md"
import sys
from pathlib import Path
from ddk.metrics import read_metrics
out, ngpu = Path(sys.argv[1]), sys.argv[2]
print(f"| setup ({ngpu} GPU) | tokens/s | peak GiB (rank 0) | final loss |")
print("|---|---|---|---|")
for run in sorted((out / "runs").iterdir()):
    m = run / "metrics.jsonl"
    steps = [r for r in read_metrics(m) if "tokens_per_s" in r] if m.exists() else []
    if not steps:
        print(f"| {run.name} | failed | | |")
        continue
    last = steps[-1]
    print(f"| {run.name} | {last['tokens_per_s']:.0f} | {last.get('peak_mem_gib', float('nan')):.1f} "
          f"| {last['loss']:.3f} |")
PY
