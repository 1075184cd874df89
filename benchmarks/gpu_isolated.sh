#!/usr/bin/env bash
# Run each GPU test node in its own process, JOBS at a time on the one GPU:
#
#   bash benchmarks/gpu_isolated.sh [JOBS] PYTEST_ARGS...
#   bash benchmarks/gpu_isolated.sh 6 -m gpu tests/kernels/test_extend_attention.py
#
# A CUDA fault (an illegal address) poisons the process's context, so in one pytest run
# every test after the first fault fails too and says nothing about its own case (session
# 10's extend step: 1 real failure, 26 after it). Here each node's result is its own.
# Prints "PASS node" / "FAIL node" lines, then the first 40 lines of each failure's log,
# and exits 1 if any node failed. Slow: every process imports torch and compiles its own
# kernels (session 10, H100, 8 jobs: 7 extend cases in 240 s, before OMP_NUM_THREADS was
# capped; one process ran 61 in 110 s). For diagnosis after a fault, with -k to narrow.
set -u
JOBS=4
if [[ ${1:-} =~ ^[0-9]+$ ]]; then JOBS=$1; shift; fi
PY=${PY:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}    # JOBS processes' CPU references share the cores
LOGS=$(mktemp -d)
$PY -m pytest -q --collect-only -p no:cacheprovider "$@" | grep '::' > "$LOGS/nodes"
echo "$(wc -l < "$LOGS/nodes") test nodes, $JOBS at a time"
one() {   # one NODE: run it alone, log to $LOGS/<n>.log
  local log="$LOGS/$(echo "$1" | md5sum | cut -c1-12).log"
  if "$PY" -m pytest -q -p no:cacheprovider "$1" > "$log" 2>&1; then echo "PASS $1"; else echo "FAIL $1"; fi
}
export -f one
export LOGS PY
xargs -P "$JOBS" -I{} bash -c 'one "$@"' _ {} < "$LOGS/nodes" | tee "$LOGS/summary"
n_fail=$(grep -c '^FAIL' "$LOGS/summary")
echo "$(grep -c '^PASS' "$LOGS/summary") passed, $n_fail failed"
grep '^FAIL' "$LOGS/summary" | while read -r _ node; do
  echo "---- $node"
  grep -E '^E |Error|error' "$LOGS/$(echo "$node" | md5sum | cut -c1-12).log" | head -n 40
done
[ "$n_fail" = 0 ]
