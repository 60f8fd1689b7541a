#!/usr/bin/env bash
# One GPU visit for the router-weight gradient from the da GEMM's row dots (issue 4), from the
# repository root on the GPU machine with RUN staged by scripts/gpu/stage_run.sh and unpacked
# (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/router_grad.sh RUN
# (about 2 minutes for OLMoE and Qwen3 in one round, 5 for the six configurations in two)
# 1. every GPU test; 2. compute-sanitizer memcheck and racecheck on SANITIZE_FILTER (default: the
# fused da GEMM with row dots, the combine backward without yp and the layer parity cases with six
# experts; small cases); 3. scripts/gpu/layer_rounds.sh without its tests at CONFIGS (default
# OLMoE and Qwen3), ROUNDS rounds (default 1). Logs packed into logs.tar.gz (a visit brings back
# at most 8 files): gpu_tests.log (step 1; layer_rounds.sh writes its own, empty, tests.log),
# sanitizer.log, peer_layer.log.
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
mkdir -p "$OUT"
status=0
step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "GPU tests (all)"
timeout 240 "$RUN/moe_cuda_tests" >"$OUT/gpu_tests.log" 2>&1 || status=1
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED" "$OUT/gpu_tests.log" | head -20
grep -B3 -A15 "Failure" "$OUT/gpu_tests.log" | head -60

filter=${SANITIZE_FILTER:-'*FusedUpProjection*Backward*:*RowsCombineBackward*:*LayerParity*e6*'}
step "compute-sanitizer on $filter (small cases)"
for tool in memcheck racecheck; do
  MOE_TEST_SMALL=1 timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 \
    "$RUN/moe_cuda_tests" --gtest_filter="$filter" >>"$OUT/sanitizer.log" 2>&1
  echo "$tool exit $?" | tee -a "$OUT/sanitizer.log"
  grep -E "ERROR SUMMARY|tests ran|^\[  (PASSED|FAILED)" "$OUT/sanitizer.log" | tail -n 3
done

CONFIGS=${CONFIGS:-"olmoe qwen3"} ROUNDS=${ROUNDS:-1} TEST_FILTER='-*' \
  OUT=$OUT bash scripts/gpu/layer_rounds.sh "$RUN" || status=1
(cd "$OUT" && tar -czf logs.tar.gz --remove-files gpu_tests.log tests.log sanitizer.log \
  peer_layer.log)
exit $status
