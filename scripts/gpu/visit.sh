# defines: step, gpu_tests, sanitize_tests -- what the GPU visit scripts share; sourced by them
# (source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"), never run on its own.

# A log line that names the step and the time (UTC), so that a visit's log shows where its minutes
# went.
step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

# gpu_tests RUN LOG [SECONDS]: every GPU test of RUN's moe_cuda_tests into LOG; prints the verdict
# and the first failures. Non-zero when a test fails or the run times out (default 300 s).
gpu_tests() {
  local run=$1 log=$2 seconds=${3:-300} rc=0
  timeout "$seconds" "$run/moe_cuda_tests" >"$log" 2>&1 || rc=1
  grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|tests ran" "$log" | head -20
  grep -B3 -A15 "Failure" "$log" | head -60
  return $rc
}

# sanitize_tests RUN FILTER LOG [SECONDS] [SMALL]: compute-sanitizer memcheck, then racecheck, on
# the GPU tests FILTER selects, both appended to LOG, each tool with its own limit (default 200 s).
# SMALL=1 (the default) leaves out the large cases (MOE_TEST_SMALL): under the sanitizer they run
# about 100x slower. Non-zero when either tool reports an error, a test fails or a run times out.
sanitize_tests() {
  local run=$1 filter=$2 log=$3 seconds=${4:-200} small=${5:-1} rc=0 tool tool_rc
  for tool in memcheck racecheck; do
    MOE_TEST_SMALL=$small timeout "$seconds" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$run/moe_cuda_tests" --gtest_filter="$filter" >>"$log" 2>&1
    tool_rc=$?
    echo "$tool exit $tool_rc" | tee -a "$log"
    grep -E "ERROR SUMMARY|tests ran|^\[  (PASSED|FAILED)" "$log" | tail -n 3
    ((tool_rc == 0)) || rc=1
  done
  return $rc
}
