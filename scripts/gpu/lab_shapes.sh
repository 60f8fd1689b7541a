#!/usr/bin/env bash
# One GPU visit (issue 4): one experts_lab A/B mode at edge shapes (the lab checks its outputs
# bit-equal before timing; optionally under compute-sanitizer) and at the three shapes. From the
# repository root on the GPU machine with RUN staged by scripts/gpu/stage_run.sh plus the lab:
#   MODE=--ab-wgrad-store OUT=/some/dir bash scripts/gpu/lab_shapes.sh RUN
# 1. edge shapes: k4 (H=256), partial (I=288, a partial column tile), rows (T=300: 2400 rows over
#    64 experts, some empty); SANITIZE=1 runs each under memcheck and racecheck (cuBLAS's
#    reference GEMMs excluded) (edges.log); 2. OLMoE, Qwen3 and the small shape, REPS rounds
#    (default 20) (lab.txt). Prints a table last.
set -uo pipefail
RUN=${1:?run folder}
MODE=${MODE:?experts_lab mode, e.g. --ab-wgrad-store}
OUT=${OUT:-out}
REPS=${REPS:-20}
mkdir -p "$OUT"
source scripts/gpu/unpack_run.sh "$RUN"
export PATH="/usr/local/cuda/bin:$PATH"
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step "device"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"

step "edge shapes ($MODE)"
tools=none
[[ ${SANITIZE:-0} == 1 ]] && tools="memcheck racecheck"
for c in "k4 1000 256 256 8 2" "partial 3000 1024 288 16 2" "rows 300 2048 1024 64 8"; do
  set -- $c
  for tool in $tools; do
    sanitizer=(compute-sanitizer --tool $tool --error-exitcode 9 --kernel-name-exclude kns=nvjet)
    [[ $tool == none ]] && sanitizer=()
    log="$OUT/edge_${1}_$tool.log"
    timeout 300 "${sanitizer[@]}" "$RUN/experts_lab" "$MODE" --reps 1 --tokens $2 --hidden $3 \
      --inter $4 --experts $5 --top-k $6 >"$log" 2>&1
    rc=$?
    [[ $rc == 0 ]] || status=1
    printf '%-8s %-9s exit %s  %s | %s\n' "$1" "$tool" "$rc" \
      "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | head -1)" \
      "$(grep -E 'AB verify' "$log" | tr -s ' ' | paste -sd';')" | tee -a "$OUT/edges.log"
    grep -q DIFFERENT "$log" && status=1
  done
done

step "the three shapes, $REPS rounds"
for c in "olmoe 16384 2048 1024 64 8" "qwen3 16384 2048 768 128 8" "small 8192 1024 4096 16 2"; do
  set -- $c
  echo "--- $1" >>"$OUT/lab.txt"
  timeout 200 "$RUN/experts_lab" "$MODE" --reps "$REPS" --tokens $2 --hidden $3 --inter $4 \
    --experts $5 --top-k $6 >>"$OUT/lab.txt" 2>&1 || status=1
done

step "table"
grep -E "^--- |AB verify|B/A" "$OUT/lab.txt"
exit $status
