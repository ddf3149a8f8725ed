#!/usr/bin/env bash
# One prepared GPU check: the trainer/loss tests on CUDA (bf16 paths), then the KD-vs-DDK
# throughput/memory benchmark at a size a GPU notices. Writes logs to ${OUT:-.}.
set -uo pipefail
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
PYTHONUNBUFFERED=1 timeout 150 python3 -m pytest -q -p no:cacheprovider -x \
  tests/losses tests/test_models.py tests/test_trainer.py 2>&1 | tail -25 | tee "$OUT/tests.log"
PYTHONUNBUFFERED=1 TQDM_DISABLE=1 timeout 200 python3 benchmarks/bench_ddk_overhead.py \
  --steps 100 --K 25 --val-sequences 32 --seq-len 1024 --batch 8 --vocab 32000 \
  --teacher 1024x12 --student 512x6 --scale 1.0 --repeats 1 2>&1 \
  | grep -v "it/s\]" | tail -12 | tee "$OUT/overhead.log"
