#!/usr/bin/env bash
# One GPU visit for the experts stage (issue 4), run from the repository root on the GPU machine
# with binaries built beforehand on a CPU machine:
#   cmake -S . -B build/gg -DCMAKE_BUILD_TYPE=Release && make -C build/gg -j2 moe_cuda_tests
#   the nvcc line at the top of bench/lab/experts_lab.cu (it needs the CUTLASS include path)
#   scripts/gpu/bundle_libs.sh build/gg
#   mkdir -p build/ggrun && cp -r build/gg/{lib,moe_cuda_tests,experts_lab} build/ggrun/
# then on the GPU machine (the whole visit fits in 300 s; every step has its own time limit):
#   OUT=/some/dir bench/lab/experts_visit.sh [build/ggrun]
# Steps: device; the experts and grouped-GEMM tests; SASS of the grouped GEMMs (HGMMA count);
# experts_lab at the OLMoE shape; compute-sanitizer memcheck on small cases; experts_lab at the
# Qwen3 shape, Zipf routing for both, and the padded layout (cublasGemmStridedBatchedEx).
# Files under $OUT (8 at most come back from a visit): tests.log (device first), sass.txt,
# sanitizer.log, lab_{olmoe,qwen3,olmoe_zipf,qwen3_zipf,olmoe_padded}.txt
set -uo pipefail
BUILD=${1:-build/ggrun}
OUT=${OUT:-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$BUILD/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
status=0
step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/tests.log"

step "experts tests"
filter='*Experts*:*Grouped*:*FusedUpProjection*:*GateUpLayout*'
timeout 80 "$BUILD/moe_cuda_tests" --gtest_filter="$filter" >>"$OUT/tests.log" 2>&1 || status=1
grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[ fused|tests ran" "$OUT/tests.log" | tail -n 30
grep -B2 -A12 "Failure" "$OUT/tests.log" | head -80

step "SASS"
if command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$BUILD/experts_lab" >"$OUT/sass_full.txt" 2>&1
  { echo "HGMMA instructions: $(grep -c HGMMA "$OUT/sass_full.txt")";
    grep -o 'HGMMA\.[A-Za-z0-9.]*' "$OUT/sass_full.txt" | sort | uniq -c | head;
    echo "per kernel with HGMMA: HGMMA SHFL STG.E.128 STG(all) LDL/STL kind stages";
    awk '/Function :/ {f=$3} /HGMMA/ {h[f]++} /SHFL/ {s[f]++} /STG\.E\.128/ {v[f]++}
         /STG/ {g[f]++} /LDL|STL/ {l[f]++}
         END {for (k in h) {
           kind = index(k, "EpilogueActivation") ? "act" : (index(k, "LinearCombinationIffff") ? "wgrad" : "store");
           if (index(k, "Pingpong")) kind = kind "-pingpong";
           st = k; sub(/.*GmmaWarpSpecializedILi/, "", st); sub(/E.*/, "", st);
           printf "%d %d %d %d %d %s %s\n", h[k], s[k], v[k], g[k], l[k], kind, st }}' \
      "$OUT/sass_full.txt"; } | tee "$OUT/sass.txt"
  rm -f "$OUT/sass_full.txt"
fi

lab() {  # name, time limit, experts_lab arguments
  local name=$1 limit=$2
  shift 2
  step "experts_lab $name: $*"
  echo "command: experts_lab $*" >"$OUT/lab_$name.txt"
  timeout "$limit" "$BUILD/experts_lab" "$@" 2>&1 | tee -a "$OUT/lab_$name.txt" || status=1
}

lab olmoe 30

step "compute-sanitizer memcheck (small cases)"
small='GroupedGemm.*:GroupedWgrad.*:*e5_empty_and_one_row_segments*:*e4_all_empty*:*e1_one_segment_swiglu*:*FusedUpProjection*:*ExpertsGraph*'
timeout 70 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
  "$BUILD/moe_cuda_tests" --gtest_brief=1 --gtest_filter="$small" >"$OUT/sanitizer.log" 2>&1
rc=$?
echo "compute-sanitizer memcheck: exit $rc" | tee -a "$OUT/sanitizer.log"
tail -n 5 "$OUT/sanitizer.log"
((rc == 0)) || status=1

lab qwen3 30 --inter 768 --experts 128
lab olmoe_zipf 25 --skew zipf --reps 10
lab qwen3_zipf 25 --inter 768 --experts 128 --skew zipf --reps 10
lab olmoe_padded 25 --layout padded --reps 10

exit $status
