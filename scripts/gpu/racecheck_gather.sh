#!/usr/bin/env bash
# One GPU visit to locate the racecheck warnings of the gathered up-projection (issue 4): racecheck
# with every hazard reported (addresses included) on the deferred activation's test, then the SASS
# of the gathered kernels around each reported offset. From the repository root on the GPU
# machine with RUN staged by scripts/gpu/stage_run.sh and unpacked:
#   OUT=/some/dir bash scripts/gpu/racecheck_gather.sh RUN
# Files under $OUT: racecheck_hazards.log, sass_at_hazards.txt
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
mkdir -p "$OUT"
MOE_TEST_SMALL=1 timeout 200 compute-sanitizer --tool racecheck --racecheck-report hazard \
  --print-limit 40 "$RUN/moe_cuda_tests" --gtest_filter='*DeferredActivation*' \
  >"$OUT/racecheck_hazards.log" 2>&1
echo "racecheck exit $?"
grep -E "RACECHECK SUMMARY|tests ran" "$OUT/racecheck_hazards.log"
offsets=$(grep -o 'Params)+0x[0-9a-f]*' "$OUT/racecheck_hazards.log" | sed 's/.*+0x//' | sort -u)
cuobjdump -sass "$RUN/moe_cuda_tests" | cu++filt >/tmp/tests.sass
for off in $offsets; do
  echo "=== offset $off"
  awk -v pat="/\\\\*0*$off\\\\*/" '
    /Function :/ { gather = ($0 ~ /GatherMainloop/); fn = $0 }
    gather {
      buf[NR % 9] = $0
      if ($0 ~ pat) {
        print substr(fn, 1, 160)
        for (i = NR - 8; i <= NR; i++) print buf[i % 9]
        n = 4
      } else if (n > 0) { print; n-- }
    }
  ' /tmp/tests.sass | cut -c1-150
done >"$OUT/sass_at_hazards.txt"
head -c 6000 "$OUT/sass_at_hazards.txt"
grep -m 12 -E "hazard detected|Write Thread|Read Thread|Current Value" \
  "$OUT/racecheck_hazards.log" | cut -c1-200
