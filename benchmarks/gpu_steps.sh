#!/usr/bin/env bash
# The GPU work of a session in named steps, for the device tool (one call = a few steps;
# each step has its own time limit and log, and a failing step does not stop the next):
#
#   bash benchmarks/gpu_steps.sh tests kernels        # results and logs in $OUT/steps.tgz
#
# Steps (seconds are the limits, sized from session 5-9 runs):
#   tests      pytest -m gpu tests/kernels (the Gluon file first), then the
#              chunk/merge tests of test_decode_parts.py on the GPU            (540)
#              (session 9 on a fresh H100: 265 s; since then many cases were added:
#              session 14's ran 62 tests of test_decode_gluon.py in its first 420 s, so
#              the step needs a call of its own, or tests_rest plus verify's extend tests)
#   tests_rest the tests step without test_extend_attention.py and test_store.py, for a
#              call that runs the extend and store steps (they test those files)  (420)
#   kernels    kernels.py --check, every shape, graph replay of the B1 rows    (300)
#   breakdown  decode_breakdown.py (per-kernel time at small batches), then again
#              with session 7's fp16 part (chunks and side stream off) and with
#              KVARN_GLUON_PAIR=1 (NOTES.md attempt 31)                           (240)
#   variants   kernels.py launch sweeps of the Gluon kernel at D 256 and D 64      (200)
#   extend     the GPU extend tests at every launch the sweep times (session 10: 61
#              cases in about 110 s), then extend.py --variants (extend attention vs fp16
#              paged vs SDPA, and the kernel / row-tile / warp / stage / workspace sweep;
#              JSON written after every shape)   (200 + 300, logs extend_tests.log, extend.log)
#              After a CUDA fault, benchmarks/gpu_isolated.sh runs each test alone.
#   engine     engine.py --gpu and the GPU engine tests                        (150)
#   store      store_variants.py (warps x register caps, NOTES.md attempt 35) and the
#              GPU store tests                                                 (200)
#   ws         the GPU extend tests of the fa kernel and its workspace, then extend.py
#              timing fa without / with the workspace at the hundreds-of-tokens shapes
#              and B32 x 16 (NOTES.md attempt 37's workspace in code order) (150 + 150)
#   verify     session 14, after an extend default changed: extend.py at the defaults, the
#              workspace on / off at 1-2 fa programs per record, the GPU engine tests, then
#              the GPU extend tests (session 14: 67 of them took 270 s)  (60 + 60 + 100 + 360)
#   ncu        session 15: ncu --set full with per-instruction stall sampling on the B1 N32K
#              record kernel and the store kernel; reports and text in steps.tgz  (200 + 200)
#   s15        session 15's call: raw_codes.py at 6 shapes, the raw / kall / qmma GPU tests, ncu
#              of the B1 N32K record kernel with raw + qmma                 (200 + 240 + 120)
#   s15b       the Gluon decode tests (not the raw / pair ones) and the GPU engine tests with
#              KVARN_GLUON_RAW=1 KVARN_GLUON_QMMA=1                          (220 + 100)
#   bd         decode_breakdown.py alone, default launches (the breakdown step's first run) (150)
#   pdl        the GPU decode tests (test_decode_gluon.py, the PDL cases among them, and
#              test_decode_attention.py), then pdl.py: graph replay and eager time with
#              programmatic dependent launch off and on (NOTES.md attempt 38)  (300 + 300)
#   defaults   sessions 12-13: the GPU extend tests at the default launch (the joint records
#              and the workspace now on there), of the dequant kernel's WORDS (attempt 45)
#              and the GPU engine tests; b1_launch.py (the Gluon path's splits x prefetch x
#              register cap under graph replay); the workspace shapes and its threshold
#              shapes (2-6 programs per record) with KVARN_DEQUANT_WORDS=1 (the default
#              since session 14), fa without / with it; the threshold shapes with WORDS off;
#              extend.py at the new defaults (six shapes)     (150 + 180 + 130 + 100 + 100)
#   short      for a short device budget: the WORDS GPU tests, b1_launch at B1 N32K at
#              128 / 256 splits, WORDS at four workspace shapes  (90 + 150 + 80)
# KVARN_GLUON_DIMS, _FP16_CHUNKS, _SIDE_STREAM, _PAIR and KVARN_PDL (decode_attention.py) pass through to
# every step.
set -u
OUT=${OUT:-/tmp/kvarn_out}
mkdir -p "$OUT"
# results and logs go to $RES, packed into $OUT/steps.tgz after every step (the device
# tool brings back at most 8 files, and what is packed survives a call cut off later)
RES=$(mktemp -d)
export PYTHONPATH=${PYTHONPATH:-.}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$RES/device.txt"
run() {   # run NAME LIMIT CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s"
  tail -n 25 "$RES/$name.log"
  tar czf "$OUT/steps.tgz.part" -C "$RES" . && mv "$OUT/steps.tgz.part" "$OUT/steps.tgz"
}
for step in "$@"; do
  case $step in
    tests) run tests 540 bash -c "$PY -m pytest -q -m gpu tests/kernels/test_decode_gluon.py tests/kernels && $PY -m pytest -q tests/kernels/test_decode_parts.py" ;;
    tests_rest) run tests_rest 420 bash -c "$PY -m pytest -q -m gpu tests/kernels/test_decode_gluon.py tests/kernels --ignore tests/kernels/test_extend_attention.py --ignore tests/kernels/test_store.py && $PY -m pytest -q tests/kernels/test_decode_parts.py" ;;
    kernels) run kernels 300 $PY benchmarks/kernels.py --check \
               --graph-latency B1_N4K B1_N32K B1_N128K B16_N16K D64_B1_N32K --out "$RES/kernels.json" ;;
    breakdown) run breakdown 240 bash -c "$PY benchmarks/decode_breakdown.py --out '$RES/breakdown.json' --gluon-launch 64 192 \
                 ; KVARN_GLUON_FP16_CHUNKS=0 KVARN_GLUON_SIDE_STREAM=0 $PY benchmarks/decode_breakdown.py --out '$RES/breakdown_s7.json' \
                 ; KVARN_GLUON_PAIR=1 $PY benchmarks/decode_breakdown.py --out '$RES/breakdown_pair.json' --gluon-launch 64 86 192" ;;
    variants) run variants 200 $PY benchmarks/kernels.py --shapes D256_B16_N16K D64_B1_N32K --no-store \
                --variants D256_B16_N16K D64_B1_N32K --out "$RES/variants.json" ;;
    extend) run extend_tests 200 $PY -m pytest -q -m gpu tests/kernels/test_extend_attention.py
            run extend 300 $PY benchmarks/extend.py --variants --out "$RES/extend.json" ;;
    engine) run engine 150 bash -c "$PY benchmarks/engine.py --gpu --out '$RES/engine.json' && $PY -m pytest -q -m gpu tests/engine/test_gpu_engine.py" ;;
    store) run store 200 bash -c "$PY benchmarks/store_variants.py '$RES/store_variants.json' && $PY -m pytest -q -m gpu tests/kernels/test_store.py" ;;
    ws) run ws_tests 150 $PY -m pytest -q -m gpu tests/kernels/test_extend_attention.py -k "workspace or fa"
        run ws 150 $PY benchmarks/extend.py --variants --workspace-only --out "$RES/extend_ws.json" \
             --shapes B1_P16K_T512 B1_P4K_T2K B4_P8K_T256 B32_P8K_T16 ;;
    defaults) run defaults_tests 150 $PY -m pytest -q -m gpu tests/kernels/test_extend_attention.py tests/engine/test_gpu_engine.py tests/kernels/test_decode_gluon.py -k "default or engine or words"
              run b1_launch 180 $PY benchmarks/b1_launch.py --out "$RES/b1_launch.json"
              run ws_words 130 env KVARN_DEQUANT_WORDS=1 $PY benchmarks/extend.py --variants --workspace-only \
                   --out "$RES/extend_ws_words.json" --shapes B1_P16K_T512 B1_P4K_T2K B4_P8K_T256 \
                   B8_P8K_T64 B8_P8K_T96 B8_P8K_T128 B8_P8K_T160 B8_P8K_T192
              run ws_threshold 100 env KVARN_DEQUANT_WORDS=0 $PY benchmarks/extend.py --variants --workspace-only --out "$RES/extend_ws_threshold.json" \
                   --shapes B8_P8K_T64 B8_P8K_T96 B8_P8K_T128 B8_P8K_T160 B8_P8K_T192
              run extend 100 $PY benchmarks/extend.py --out "$RES/extend.json" ;;
    short) run words_tests 90 $PY -m pytest -q -m gpu tests/kernels/test_extend_attention.py -k "words"
          run b1_launch 150 $PY benchmarks/b1_launch.py --shapes B1_N32K --splits 128 256 --out "$RES/b1_launch.json"
          run ws_words 80 env KVARN_DEQUANT_WORDS=1 $PY benchmarks/extend.py --variants --workspace-only \
               --out "$RES/extend_ws_words.json" --shapes B4_P8K_T256 B1_P16K_T512 B8_P8K_T64 B8_P8K_T128 ;;
    verify) run extend 60 $PY benchmarks/extend.py --out "$RES/extend.json"
            run ws_low 60 $PY benchmarks/extend.py --variants --workspace-only --out "$RES/extend_ws_low.json" \
                 --shapes B8_P8K_T32 B8_P8K_T64 B32_P8K_T16
            run engine_tests 100 $PY -m pytest -q -m gpu tests/engine/test_gpu_engine.py
            run extend_tests 360 $PY -m pytest -q -m gpu tests/kernels/test_extend_attention.py ;;
    s15) # session 15 in one call: raw / kall tests, raw_codes.py, the B1 record kernel under ncu
         run raw_codes 200 $PY benchmarks/raw_codes.py --out "$RES/raw_codes.json" \
              --shapes B1_N32K B1_N4K B1_N128K B64_N16K D64_B1_N32K D256_B16_N16K
         run raw_tests 240 $PY -m pytest -q -m gpu tests/kernels/test_decode_gluon.py -k "raw"
         run ncu_b1 120 bash -c "KVARN_GLUON_RAW=1 KVARN_GLUON_QMMA=1 ncu --clock-control none --kernel-name regex:record_attention_kernel --launch-skip 2 \
               --launch-count 1 --set full --import-source yes -f -o '$RES/ncu_b1' \
               $PY benchmarks/profile_kernels.py --shape B1_N32K \
             && ncu -i '$RES/ncu_b1.ncu-rep' --page details --print-details all > '$RES/ncu_b1_details.txt' 2>&1; \
             ncu -i '$RES/ncu_b1.ncu-rep' --page source --print-source sass --csv > '$RES/ncu_b1_sass.csv' 2>&1; \
             $PY benchmarks/ncu_summary.py '$RES/ncu_b1_sass.csv' > '$RES/ncu_b1_top.txt' 2>&1; \
             grep -E 'Issue Slots Busy|Issued Ipc|Warp Cycles Per Issued|Achieved Occupancy|Eligible Warps|Memory Throughput|Duration|Registers Per' '$RES/ncu_b1_details.txt' | head -20; \
             head -40 '$RES/ncu_b1_top.txt'" ;;
    s15b) # session 15's second call: the Gluon decode tests and the GPU engine tests with raw +
          # qmma on through the environment (the candidate defaults)
          run gluon_rawq_tests 220 env KVARN_GLUON_RAW=1 KVARN_GLUON_QMMA=1 $PY -m pytest -q -m gpu \
               tests/kernels/test_decode_gluon.py -k "not raw and not pair"
          run engine_rawq_tests 100 env KVARN_GLUON_RAW=1 KVARN_GLUON_QMMA=1 $PY -m pytest -q -m gpu \
               tests/engine/test_gpu_engine.py ;;
    ncu) # session 15: Nsight Compute (full set, per-instruction stall sampling) on the B1 N32K
         # Gluon record kernel and on the store kernel (8B shape, 16K tokens); L2 flushed
         # before the profiled launch (ncu's default cache control), clocks left alone
         for what in b1:--shape=B1_N32K:record_attention_kernel store:--shape=none\ --store:_store; do
           IFS=: read -r tag pargs kname <<< "$what"
           run ncu_$tag 200 bash -c "ncu --clock-control none --kernel-name regex:$kname --launch-skip 2 \
               --launch-count 1 --set full --import-source yes -f -o '$RES/ncu_$tag' \
               $PY benchmarks/profile_kernels.py $pargs \
             && ncu -i '$RES/ncu_$tag.ncu-rep' --page details --print-details all > '$RES/ncu_${tag}_details.txt' 2>&1; \
             ncu -i '$RES/ncu_$tag.ncu-rep' --page source --print-source sass --csv > '$RES/ncu_${tag}_sass.csv' 2>&1; \
             ls -la '$RES'"
         done ;;
    bd) run bd 150 $PY benchmarks/decode_breakdown.py --out "$RES/breakdown.json" ;;
    pdl) run pdl_tests 300 $PY -m pytest -q -m gpu tests/kernels/test_decode_gluon.py tests/kernels/test_decode_attention.py
         run pdl 300 $PY benchmarks/pdl.py --out "$RES/pdl.json" ;;
    *) echo "unknown step $step (tests tests_rest kernels breakdown variants extend engine store pdl ws bd defaults short verify ncu s15 s15b)"; exit 2 ;;
  esac
done
