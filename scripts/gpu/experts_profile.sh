#!/usr/bin/env bash
# One GPU visit that looks inside the up-projection's kernels with Nsight Compute (issue 4): where
# the fused activation epilogue's time goes, next to the plain grouped GEMM and the separate
# activation pass it replaces. Run from the repository root on the GPU machine with binaries
# staged beforehand (scripts/gpu/stage_run.sh, plus build/gg/experts_lab built with the nvcc line
# at the top of bench/lab/experts_lab.cu):
#   OUT=/some/dir scripts/gpu/experts_profile.sh BUILD [lab arguments]
# Default shape: Qwen3-30B-A3B (T=16384 H=2048 I=768 E=128 K=8), where the fused epilogue costs
# most relative to the GEMM. Steps, each with its own time limit:
#   1. device; the CUDA-graph and experts tests (tests.log)
#   2. ncu --set full on the first launch of three kernels in one experts_lab run each:
#      the plain grouped up-projection, the one with the activation epilogue, and the separate
#      activation pass; per kernel: details (speed of light, warp states, memory) and the SASS
#      lines with the most stall samples (ncu_<name>.txt)
#   3. experts_lab timings at the same shape (lab.txt)
# Prints a short table last.
set -uo pipefail
BUILD=${1:?usage: experts_profile.sh BUILD [experts_lab arguments]}
shift
LAB_ARGS=("$@")
((${#LAB_ARGS[@]})) || LAB_ARGS=(--inter 768 --experts 128)
OUT=${OUT:-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$BUILD/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/tests.log"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/revision /' | tee -a "$OUT/tests.log"

step "tests: CUDA graph of the layer, experts, grouped GEMMs"
timeout 120 "$BUILD/moe_cuda_tests" \
  --gtest_filter='*LayerGraph*:*Experts*:*Grouped*:*FusedUpProjection*:*GateUpLayout*' \
  >>"$OUT/tests.log" 2>&1 || status=1
grep -E "^\[  (FAILED|PASSED) |tests ran" "$OUT/tests.log" | tail -n 8
grep -B2 -A12 "Failure" "$OUT/tests.log" | head -60

# name, kernel regex (demangled names), then the lab runs once with a single repetition.
profile() {
  local name=$1 regex=$2
  step "ncu $name ($regex)"
  timeout 150 ncu --clock-control none --set full --import-source no --kernel-name-base demangled \
    -k "regex:$regex" -c 1 -f -o "$OUT/ncu_$name" \
    "$BUILD/experts_lab" "${LAB_ARGS[@]}" --reps 1 --no-backward >"$OUT/ncu_${name}_run.log" 2>&1 ||
    { status=1; tail -n 5 "$OUT/ncu_${name}_run.log"; return; }
  {
    ncu -i "$OUT/ncu_$name.ncu-rep" --page details --print-details all 2>&1 ||
      ncu -i "$OUT/ncu_$name.ncu-rep" --page details 2>&1
    echo
    echo "--- warp stall reasons (raw metrics, per issued instruction where available)"
    ncu -i "$OUT/ncu_$name.ncu-rep" --page raw --csv 2>&1 | python3 -c '
import csv, sys
rows = list(csv.reader(sys.stdin))
if len(rows) >= 3:
    for name, unit, value in zip(rows[0], rows[1], rows[2]):
        if "warp_issue_stalled" in name and "ratio" in name or "inst_executed.sum" in name:
            print(f"  {name:90s} {value:>14s} {unit}")
'
    echo
    echo "--- SASS lines with the most warp stall samples"
    ncu -i "$OUT/ncu_$name.ncu-rep" --page source --csv --print-source sass 2>&1 |
      python3 scripts/gpu/stall_lines.py 40
  } >"$OUT/ncu_$name.txt"
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Warp Cycles Per Issued|Registers Per Thread" \
    "$OUT/ncu_$name.txt" | head -n 12
  rm -f "$OUT/ncu_$name.ncu-rep"
}

# The first CUTLASS kernel of the lab is the plain up-projection (experts_forward, grouped).
profile up_plain 'cutlass::device_kernel'
profile up_act 'device_kernel.*EpilogueActivation'
profile act_pass 'activation_forward_kernel'

step "experts_lab ${LAB_ARGS[*]}"
echo "command: experts_lab ${LAB_ARGS[*]} --no-backward" >"$OUT/lab.txt"
timeout 60 "$BUILD/experts_lab" "${LAB_ARGS[@]}" --no-backward 2>&1 | tee -a "$OUT/lab.txt" ||
  status=1

step "summary"
for n in up_plain up_act act_pass; do
  f="$OUT/ncu_$n.txt"
  [[ -f $f ]] || continue
  printf '%-9s %s\n' "$n" "$(grep -m1 -E '^ +Duration' "$f" | tr -s ' ')"
done
grep -E "^(G1|G3|G3n|X5|F1|F3|F3n) " "$OUT/lab.txt"
exit $status
