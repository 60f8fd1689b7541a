#!/usr/bin/env bash
# One GPU visit for the experts stage (issue 4), run from the repository root on the GPU machine
# with binaries built beforehand on a CPU machine:
#   cmake -S . -B build/gg -DCMAKE_BUILD_TYPE=Release && make -C build/gg -j2 moe_cuda_tests
#   nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -Iinclude \
#     -Isrc bench/lab/experts_lab.cu -o build/gg/experts_lab build/gg/libmoe_cuda.a \
#     build/gg/libmoe.a -lcublas -lcublasLt
#   scripts/gpu/bundle_libs.sh build/gg
#   mkdir -p build/ggrun && cp -r build/gg/{lib,moe_cuda_tests,experts_lab} build/ggrun/
# then on the GPU machine:
#   OUT=/some/dir bench/lab/experts_visit.sh [build/ggrun]
# Steps: device; the experts and grouped-GEMM tests; SASS of the grouped GEMM (HGMMA count);
# compute-sanitizer memcheck on small cases; experts_lab at the OLMoE shape (uniform, then Zipf).
# Files under $OUT: gpu.txt tests.log sass.txt sanitizer.log lab_olmoe.txt lab_olmoe_zipf.txt
set -uo pipefail
BUILD=${1:-build/ggrun}
OUT=${OUT:-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$BUILD/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
status=0
step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

step "experts tests"
filter='Shapes/ExpertsParity.*:GroupedGemm.*:ExpertsPlan.*:ExpertsWorkspace.*'
timeout 150 "$BUILD/moe_cuda_tests" --gtest_filter="$filter" >"$OUT/tests.log" 2>&1 || status=1
grep -E "^\[  (FAILED|PASSED|SKIPPED) " "$OUT/tests.log" | tail -n 30

step "SASS"
if command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$BUILD/experts_lab" >"$OUT/sass_full.txt" 2>&1
  { echo "HGMMA instructions: $(grep -c HGMMA "$OUT/sass_full.txt")";
    grep -o 'HGMMA\.[A-Za-z0-9.]*' "$OUT/sass_full.txt" | sort | uniq -c | head; } | tee "$OUT/sass.txt"
  rm -f "$OUT/sass_full.txt"
fi

step "compute-sanitizer memcheck (small cases)"
small='GroupedGemm.*:*e5_empty_and_one_row_segments*:*e4_all_empty*:*e1_one_segment_swiglu*'
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
  "$BUILD/moe_cuda_tests" --gtest_brief=1 --gtest_filter="$small" >"$OUT/sanitizer.log" 2>&1
rc=$?
echo "compute-sanitizer memcheck: exit $rc" | tee -a "$OUT/sanitizer.log"
((rc == 0)) || status=1

step "experts_lab OLMoE uniform"
timeout 120 "$BUILD/experts_lab" 2>&1 | tee "$OUT/lab_olmoe.txt" || status=1

step "experts_lab OLMoE zipf (forward)"
timeout 60 "$BUILD/experts_lab" --skew zipf --no-backward --reps 10 2>&1 |
  tee "$OUT/lab_olmoe_zipf.txt" || status=1

exit $status
