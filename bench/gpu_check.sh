#!/usr/bin/env bash
# The device check of docs/performance.md: one call, under 10 minutes on an H100, JSON to $OUT.
#
#   bash bench/gpu_check.sh          # in the repo root; OUT defaults to /tmp/fedblood_gpu
#   bash bench/gpu_check.sh --tiny   # the same script on a CPU in a few minutes (a smoke check)
#   PARTS=sweep bash bench/gpu_check.sh   # only some parts (default: "round step sweep")
#
# 1. gpu_round.py --quick: the paper-scale round (224 px, VGG16 fc head, frozen 3, bfloat16,
#    FedDyn, batch 64) at 1/20 of the study's center sizes: the isolated step's MFU, 'loop'
#    (what execution='auto' runs on one device) against 'vmap', the projected 100 rounds.
# 2. bench_step.py: the same step (224 px, fc head, frozen 3, batch 64) in bfloat16 and float32.
# 3. bench_sweep.py --seeds 8: the CPU study's round (configs/wbc.py: 64 px, width 1/8, its 4
#    centers' sizes) for 8 seeds, as one vectorized program against 8 sequential runs.
# 4. bench_dp.py: DP-SGD's local step against the plain one (configs/wbc.py's model, batch 32;
#    per-example gradients in microbatches of 32 and 8), float32 and bfloat16.
# Each part has its own time limit, so one that hangs still leaves the others' results.
set -u
OUT=${OUT:-/tmp/fedblood_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
PARTS=${PARTS:-round step sweep dp}
ROUND_ARGS=() STEP_ARGS=(--sizes 224 --batch 64) SWEEP_ARGS=(--seeds 8 --rounds 3) DP_ARGS=()
if [ "${1:-}" = --tiny ]; then
  ROUND_ARGS=(--tiny) STEP_ARGS=(--sizes 32 --batch 4 --width 0.0625) SWEEP_ARGS=(--tiny --seeds 8)
  DP_ARGS=(--quick --steps 1 --repeats 1)
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c 'import jax; print(jax.__version__, jax.devices())'; } > "$OUT/machine.txt" 2>&1
case " $PARTS " in *" round "*)
  timeout 330 $PY bench/gpu_round.py --quick "${ROUND_ARGS[@]}" --out "$OUT/gpu_round_quick.json" \
    > "$OUT/gpu_round_quick.log" 2>&1
  echo "gpu_round exit $?"; tail -n 12 "$OUT/gpu_round_quick.log";;
esac
case " $PARTS " in *" step "*)
  timeout 150 $PY bench/bench_step.py "${STEP_ARGS[@]}" --heads fc --frozen 3 \
    --dtypes bfloat16 float32 --steps 5 --no_torch --peak_tflops 989 \
    > "$OUT/bench_step_224.log" 2>&1
  echo "bench_step exit $?"; tail -n 8 "$OUT/bench_step_224.log";;
esac
case " $PARTS " in *" sweep "*)
  timeout 110 $PY bench/bench_sweep.py "${SWEEP_ARGS[@]}" --out "$OUT/bench_sweep_8.json" \
    > "$OUT/bench_sweep_8.log" 2>&1
  echo "bench_sweep exit $?"; tail -n 6 "$OUT/bench_sweep_8.log";;
esac
case " $PARTS " in *" dp "*)
  for dtype in float32 bfloat16; do
    timeout 60 $PY bench/bench_dp.py "${DP_ARGS[@]}" --dtype $dtype \
      > "$OUT/bench_dp_$dtype.log" 2>&1
    echo "bench_dp $dtype exit $?"; tail -n 5 "$OUT/bench_dp_$dtype.log" | head -n 4
  done;;
esac
