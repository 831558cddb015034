#!/usr/bin/env bash
# The device check of docs/performance.md: one call, about 7 minutes on an H100, JSON to $OUT.
#
#   bash bench/gpu_check.sh        # in the repo root; OUT defaults to /tmp/fedblood_gpu
#
# 1. gpu_round.py --quick: the paper-scale round (224 px, VGG16 fc head, frozen 3, bfloat16,
#    FedDyn, batch 64) at 1/20 of the study's center sizes: the isolated step's MFU, 'loop'
#    (what execution='auto' runs on one device) against 'vmap', the projected 100 rounds.
# 2. bench_step.py at 224 px, frozen 3, both heads, bfloat16 and float32 (batch 64).
# Each part has its own time limit, so one that hangs still leaves the other's results.
set -u
OUT=${OUT:-/tmp/fedblood_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c 'import jax; print(jax.__version__, jax.devices())'; } > "$OUT/machine.txt" 2>&1
timeout 330 $PY bench/gpu_round.py --quick --out "$OUT/gpu_round_quick.json" \
  > "$OUT/gpu_round_quick.log" 2>&1
echo "gpu_round exit $?"; tail -n 12 "$OUT/gpu_round_quick.log"
timeout 150 $PY bench/bench_step.py --sizes 224 --heads fc gap --frozen 3 \
  --dtypes bfloat16 float32 --batch 64 --steps 5 --no_torch --peak_tflops 989 \
  > "$OUT/bench_step_224.log" 2>&1
echo "bench_step exit $?"; tail -n 8 "$OUT/bench_step_224.log"
