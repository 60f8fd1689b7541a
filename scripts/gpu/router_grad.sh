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
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step "GPU tests (all)"
gpu_tests "$RUN" "$OUT/gpu_tests.log" 240 || status=1

filter=${SANITIZE_FILTER:-'*FusedUpProjection*Backward*:*RowsCombineBackward*:*LayerParity*e6*'}
step "compute-sanitizer on $filter (small cases)"
sanitize_tests "$RUN" "$filter" "$OUT/sanitizer.log" 150 || status=1

CONFIGS=${CONFIGS:-"olmoe qwen3"} ROUNDS=${ROUNDS:-1} TEST_FILTER='-*' \
  OUT=$OUT bash scripts/gpu/layer_rounds.sh "$RUN" || status=1
(cd "$OUT" && tar -czf logs.tar.gz --remove-files gpu_tests.log tests.log sanitizer.log \
  peer_layer.log)
exit $status
