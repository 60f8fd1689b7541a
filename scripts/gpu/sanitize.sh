#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck on the small GPU tests (MOE_TEST_SMALL=1), from the
# repository root on the GPU machine with binaries staged by scripts/gpu/stage_run.sh:
#   OUT=/some/dir bash scripts/gpu/sanitize.sh RUN [gtest filter]
#   OUT=/some/dir SHARDS=4 TIMEOUT=500 bash scripts/gpu/sanitize.sh RUN '*'   # the whole suite
# SHARDS > 1 splits the tests by gtest's sharding and runs every (tool, shard) at once, as
# separate processes on the one GPU; TOOLS picks the tools (default both).
# Writes TOOL.log (or TOOL_SHARD.log) under $OUT, then one line per log: exit status, tests
# passed, the tool's summary; exit 1 if any run failed, found an error or ran out of time.
set -uo pipefail
RUN=${1:?usage: sanitize.sh RUN [filter]}
FILTER=${2:-'*SoftMoeLayer*:*ChainLayer*:*ExpertChoiceGroups*:*AdamWChunks*:*DenseActivation*:GroupedWgrad.*:*e5_empty_and_one_row_segments*Overwritten*'}
OUT=${OUT:-out}
SHARDS=${SHARDS:-1}
TIMEOUT=${TIMEOUT:-240}
EXCLUDE=${EXCLUDE:-}  # kernel names containing this are not instrumented, e.g. cuBLAS's nvjet
BRIEF=${BRIEF:-1}     # 0: every test's name in the log, to see where a run stopped
mkdir -p "$OUT"
source scripts/gpu/unpack_run.sh "$RUN"
export MOE_TEST_SMALL=1
logs=()
for tool in ${TOOLS:-memcheck racecheck}; do
  for ((s = 0; s < SHARDS; ++s)); do
    log=$OUT/$tool.log
    ((SHARDS > 1)) && log=$OUT/${tool}_$s.log
    logs+=("$log")
    (
      ((SHARDS > 1)) && export GTEST_TOTAL_SHARDS=$SHARDS GTEST_SHARD_INDEX=$s
      timeout "$TIMEOUT" compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
        ${EXCLUDE:+--kernel-name-exclude "kns=$EXCLUDE"} \
        "$RUN/moe_cuda_tests" --gtest_brief="$BRIEF" --gtest_filter="$FILTER" >"$log" 2>&1
      echo "compute-sanitizer $tool: exit $?" >>"$log"
    ) &
  done
done
printf 'started %d sanitizer runs at %s UTC\n' "${#logs[@]}" "$(date -u +%H:%M:%S)"
wait
status=0
printf '%-16s %-6s %-34s %s\n' log exit tests summary
for log in "${logs[@]}"; do
  rc=$(sed -n 's/^compute-sanitizer [a-z]*: exit //p' "$log" | tail -n 1)
  tests=$(grep -oE '^\[  PASSED  \] [0-9]+ tests?' "$log" | grep -oE '[0-9]+' | tail -n 1)
  skipped=$(grep -oE '^\[  SKIPPED \] [0-9]+ tests?' "$log" | grep -oE '[0-9]+' | tail -n 1)
  failed=$(grep -oE '^\[  FAILED  \] [0-9]+ tests?,' "$log" | grep -oE '[0-9]+' | tail -n 1)
  summary=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -n 1 | sed 's/^=* *//')
  if [[ $rc == 124 ]]; then
    summary="timed out after ${TIMEOUT} s, $(grep -cE '^\[       OK \]' "$log") tests done"
  fi
  printf '%-16s %-6s %-34s %s\n' "$(basename "$log" .log)" "$rc" \
    "${tests:-0} passed${skipped:+, $skipped skipped}${failed:+, $failed failed}" "$summary"
  [[ $rc == 0 ]] || status=1
done
exit $status
