#!/usr/bin/env bash
# One GPU visit for the data path (issue 3), run from the repository root on the GPU machine with a
# build made beforehand on a CPU machine:
#   cmake -S . -B build/gpu -DCMAKE_BUILD_TYPE=Release && cmake --build build/gpu -j
#   scripts/gpu/bundle_libs.sh build/gpu          # non-CUDA shared libraries next to the binaries
# then on the GPU machine:
#   OUT=/some/dir scripts/gpu/data_path.sh [BUILD=build/gpu] [PHASE=all]
# PHASE: correctness (CUDA tests; compute-sanitizer memcheck + racecheck on the parity tests at
# small shapes; `moe-bench check --large`), measure (`moe-bench bench` over the headline shape and
# both brief grids, uniform and Zipf, bf16, plus the headline in fp32; the PyTorch peer on the same
# card in the same call; the summary table), all (both), quick (tests + headline only).
# Files under $OUT: gpu.txt tests.log sanitizer.log check.log bench.jsonl bench_table.txt
# peer.jsonl peer.log summary.txt (at most 8 come back from a lent machine: correctness and
# measure are sized to be separate calls).
# PHASE=soft_moe (one call of its own): the soft MoE CUDA tests, `moe-bench check --only soft_moe
# --large`, `moe-bench bench --grid soft_moe --dtype bf16 fp32`, then compute-sanitizer memcheck
# and racecheck on the soft MoE parity tests at small shapes within what is left of
# MOE_SOFT_BUDGET seconds (default 220). Files: gpu.txt soft_moe_tests.log soft_moe_check.log
# soft_moe.jsonl soft_moe_table.txt soft_moe_sanitizer.log.
set -uo pipefail
BUILD=${1:-build/gpu}
PHASE=${2:-all}
OUT=${OUT:-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$BUILD/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv | tee "$OUT/gpu.txt"

if [[ $PHASE == soft_moe ]]; then
deadline=$((SECONDS + ${MOE_SOFT_BUDGET:-220}))
left() { echo $((deadline - SECONDS)); }
step "soft MoE CUDA tests"
"$BUILD/moe_cuda_tests" --gtest_brief=1 --gtest_filter='*SoftMoe*' >"$OUT/soft_moe_tests.log" 2>&1 || status=1
tail -n 4 "$OUT/soft_moe_tests.log"

step "moe-bench check --only soft_moe --large"
"$BUILD/moe-bench" check --only soft_moe --large >"$OUT/soft_moe_check.log" 2>&1 || status=1
grep -E '^soft_moe|^FAIL|^check:' "$OUT/soft_moe_check.log"

step "moe-bench bench --grid soft_moe"
"$BUILD/moe-bench" bench --grid soft_moe --dtype bf16 fp32 --out "$OUT/soft_moe.jsonl" \
  >"$OUT/soft_moe_table.txt" 2>&1 || status=1

step "compute-sanitizer (soft MoE, small shapes)"
: >"$OUT/soft_moe_sanitizer.log"
for tool in memcheck racecheck; do
  budget=$(( $(left) - 5 ))
  if ((budget < 20)); then
    echo "compute-sanitizer $tool: not run ($budget s left)" | tee -a "$OUT/soft_moe_sanitizer.log"
    continue
  fi
  MOE_TEST_SMALL=1 timeout "$budget" compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 \
    "$BUILD/moe_cuda_tests" --gtest_brief=1 --gtest_filter='*SoftMoeParity*' >>"$OUT/soft_moe_sanitizer.log" 2>&1
  rc=$?
  echo "compute-sanitizer $tool: exit $rc" | tee -a "$OUT/soft_moe_sanitizer.log"
  ((rc == 0)) || status=1
done
step "soft MoE bench (bf16 forward stages; every stage and fp32 in soft_moe_table.txt)"
grep -E '\| copy|^stage' "$OUT/soft_moe_table.txt"
grep -E '^soft_moe\.(gate|dispatch_softmax|combine_softmax|dispatch_gemm|combine_gemm|forward) .* bf16 ' \
  "$OUT/soft_moe_table.txt"
fi

if [[ $PHASE == all || $PHASE == correctness || $PHASE == quick ]]; then
step "CUDA tests"
"$BUILD/moe_cuda_tests" --gtest_brief=1 >"$OUT/tests.log" 2>&1 || status=1
tail -n 4 "$OUT/tests.log"
fi

if [[ $PHASE == all || $PHASE == correctness ]]; then
step "compute-sanitizer (small shapes)"
filter='*PlanParity.Matches*:*RowsParity*_h7:*RowsParity*_h136:*RowsDeterminism*:*RowsProperty*:*RouteParity*'
[[ -n "${MOE_SANITIZER_FILTER:-}" ]] && filter=$MOE_SANITIZER_FILTER
: >"$OUT/sanitizer.log"
for tool in memcheck racecheck; do
  MOE_TEST_SMALL=1 timeout "${MOE_SANITIZER_TIMEOUT:-240}" compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 \
    "$BUILD/moe_cuda_tests" --gtest_brief=1 --gtest_filter="$filter" >>"$OUT/sanitizer.log" 2>&1
  rc=$?
  echo "compute-sanitizer $tool: exit $rc" | tee -a "$OUT/sanitizer.log"
  ((rc == 0)) || status=1
done

step "moe-bench check"
"$BUILD/moe-bench" check --large >"$OUT/check.log" 2>&1 || status=1
tail -n 30 "$OUT/check.log"
fi

if [[ $PHASE == all || $PHASE == measure || $PHASE == quick ]]; then
step "moe-bench bench"
if [[ $PHASE == quick ]]; then grids="headline"; else grids="headline brief1 brief2"; fi
"$BUILD/moe-bench" bench --grid $grids --out "$OUT/bench.jsonl" >"$OUT/bench_table.txt" 2>&1 || status=1
# headline again in fp32 (bf16 is the default everywhere)
"$BUILD/moe-bench" bench --grid headline --dtype fp32 --out "$OUT/bench.jsonl" \
  >>"$OUT/bench_table.txt" 2>&1 || status=1

step "PyTorch peer"
if [[ $PHASE == quick ]]; then pgrids="headline"; else pgrids="headline brief2"; fi
python3 bench/peers/torch_pack_combine.py --grid $pgrids --build "$BUILD" \
  --out "$OUT/peer.jsonl" 2>"$OUT/peer.log" || status=1
tail -n 3 "$OUT/peer.log"

step "summary"
python3 scripts/gpu/summarize.py "$OUT/bench.jsonl" "$OUT/peer.jsonl" | tee "$OUT/summary.txt"
fi
exit $status
