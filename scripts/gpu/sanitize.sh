#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck on the small GPU tests of the newest kernels, from the
# repository root on the GPU machine with binaries staged by scripts/gpu/stage_run.sh:
#   OUT=/some/dir bash scripts/gpu/sanitize.sh RUN [gtest filter]
# Writes memcheck.log and racecheck.log under $OUT; prints each tool's verdict.
set -uo pipefail
RUN=${1:?usage: sanitize.sh RUN [filter]}
FILTER=${2:-'*SoftMoeLayer*:*ChainLayer*:*ExpertChoiceGroups*:*AdamWChunks*:*DenseActivation*:GroupedWgrad.*:*e5_empty_and_one_row_segments*Overwritten*'}
OUT=${OUT:-out}
mkdir -p "$OUT"
source scripts/gpu/unpack_run.sh "$RUN"
export MOE_TEST_SMALL=1
status=0
for tool in memcheck racecheck; do
  printf '\n=== %s (%s)\n' "$tool" "$(date -u +%H:%M:%S)"
  timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
    "$RUN/moe_cuda_tests" --gtest_brief=1 --gtest_filter="$FILTER" >"$OUT/$tool.log" 2>&1
  rc=$?
  echo "compute-sanitizer $tool: exit $rc" | tee -a "$OUT/$tool.log"
  grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/$tool.log" | tail -n 5
  ((rc == 0)) || status=1
done
exit $status
