#!/usr/bin/env bash
# The GPU work of a session in named steps, for the device tool (one call = a few steps;
# each step has its own time limit and log, and a failing step does not stop the next):
#
#   bash benchmarks/gpu_steps.sh tests kernels        # results and logs under $OUT
#
# Steps (seconds are the limits, sized from session 5-6 runs):
#   tests      pytest -m gpu tests/kernels (the Gluon file first), then the
#              chunk/merge tests of test_decode_parts.py on the GPU            (300)
#   kernels    kernels.py --check, every shape, graph replay of the B1 rows    (300)
#   breakdown  decode_breakdown.py (per-kernel time at small batches), then
#              again with KVARN_GLUON_FP16_CHUNKS=1 (NOTES.md attempt 29)         (150)
#   extend     extend.py (extend attention vs fp16 paged vs SDPA)             (90)
#   engine     engine.py --gpu and the GPU engine tests                        (150)
# KVARN_GLUON_DIMS and KVARN_GLUON_FP16_CHUNKS (decode_attention.py) pass through to
# every step.
set -u
OUT=${OUT:-/tmp/kvarn_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
run() {   # run NAME LIMIT CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
}
for step in "$@"; do
  case $step in
    tests) run tests 300 bash -c "$PY -m pytest -q -m gpu tests/kernels/test_decode_gluon.py tests/kernels && $PY -m pytest -q tests/kernels/test_decode_parts.py" ;;
    kernels) run kernels 300 $PY benchmarks/kernels.py --check \
               --graph-latency B1_N4K B1_N32K B1_N128K B16_N16K D64_B1_N32K --out "$OUT/kernels.json" ;;
    breakdown) run breakdown 150 bash -c "$PY benchmarks/decode_breakdown.py --out '$OUT/breakdown.json' --gluon-launch 64 192 254 254:128 254:144 \
                 && KVARN_GLUON_FP16_CHUNKS=1 $PY benchmarks/decode_breakdown.py --out '$OUT/breakdown_chunks.json'" ;;
    extend) run extend 90 $PY benchmarks/extend.py --out "$OUT/extend.json" ;;
    engine) run engine 150 bash -c "$PY benchmarks/engine.py --gpu --out '$OUT/engine.json' && $PY -m pytest -q -m gpu tests/engine/test_gpu_engine.py" ;;
    *) echo "unknown step $step (tests kernels breakdown extend engine)"; exit 2 ;;
  esac
done
