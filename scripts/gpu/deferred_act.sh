#!/usr/bin/env bash
# One GPU visit for an epilogue run under the next tile's mainloop (issue 4), from
# the repository root on the GPU machine with RUN staged by scripts/gpu/stage_run.sh plus the lab
# binary (scripts/gpu/build_lab.sh), unpacked (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/deferred_act.sh RUN
# 1. every GPU test; 2. compute-sanitizer memcheck and racecheck on SANITIZE_FILTER (default: the
# deferred activation's test and the fused forward's); 3. experts_lab LAB_ARGS at the OLMoE and
# Qwen3 shapes (default --ab-deferred --no-backward: immediate against deferred act, permuted and
# gathered rows; --ab-act-grad: the da GEMM's epilogue likewise; alternating rounds, both shapes
# in lab_deferred.txt); 4. scripts/gpu/layer_rounds.sh without its tests at
# CONFIGS (default OLMoE and Qwen3), ROUNDS rounds (default 1). Logs packed into logs.tar.gz (a
# visit brings back at most 8 files).
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
mkdir -p "$OUT"
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step "GPU tests (all)"
gpu_tests "$RUN" "$OUT/gpu_tests.log" 240 || status=1

filter=${SANITIZE_FILTER:-'*DeferredActivation*:*FusedUpProjection*Equals*'}
step "compute-sanitizer on $filter"
sanitize_tests "$RUN" "$filter" "$OUT/sanitizer.log" || status=1

for shape in "olmoe 1024 64" "qwen3 768 128"; do
  read -r name inter experts <<<"$shape"
  step "experts_lab ${LAB_ARGS:=--ab-deferred --no-backward} $name"
  echo "### $name" >>"$OUT/lab_deferred.txt"
  # shellcheck disable=SC2086  # LAB_ARGS is a list of flags
  timeout 150 "$RUN/experts_lab" $LAB_ARGS --reps 20 --tokens 16384 \
    --hidden 2048 --inter "$inter" --experts "$experts" --top-k 8 \
    >>"$OUT/lab_deferred.txt" 2>&1 || status=1
  sed -n "/### $name/,\$p" "$OUT/lab_deferred.txt" | grep -E "^AB|Disposition"
done

CONFIGS=${CONFIGS:-"olmoe qwen3"} ROUNDS=${ROUNDS:-1} TEST_FILTER='-*' \
  OUT=$OUT bash scripts/gpu/layer_rounds.sh "$RUN" || status=1
(cd "$OUT" && tar -czf logs.tar.gz --remove-files gpu_tests.log tests.log sanitizer.log \
  peer_layer.log)
exit $status
