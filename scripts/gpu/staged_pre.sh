#!/usr/bin/env bash
# One GPU visit (issue 4): the da GEMM with its activation backward deferred under the next
# tile's mainloop and each tile's pre brought into the stages by the producer's TMA
# (experts_lab --ab-act-grad-staged), against the library's immediate epilogue. From the
# repository root on the GPU machine with RUN staged by scripts/gpu/stage_run.sh plus the lab:
#   OUT=/some/dir bash scripts/gpu/staged_pre.sh RUN
# 1. edge shapes (fewer than 8 k-slices, a partial column tile, few rows) under compute-sanitizer
#    memcheck and racecheck (our kernels: cuBLAS's reference GEMMs excluded), or with SANITIZE=0
#    alone: the lab checks dpre and the row dots bit-equal before timing (sanitizer.log);
#    2. the three shapes, REPS rounds (lab_staged.txt). Prints a table last.
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
REPS=${REPS:-20}
mkdir -p "$OUT"
source scripts/gpu/unpack_run.sh "$RUN"
export PATH="/usr/local/cuda/bin:$PATH"
status=0
step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"

# name tokens hidden inter experts top-k
edges=("k4 1000 256 256 8 2" "partial 3000 1024 288 16 2" "rows 300 2048 1024 64 8")
step "edge shapes under compute-sanitizer"
for c in "${edges[@]}"; do
  set -- $c
  tools="memcheck racecheck"
  [[ ${SANITIZE:-1} == 0 ]] && tools=none
  for tool in $tools; do
    sanitizer=(compute-sanitizer --tool $tool --error-exitcode 9 --kernel-name-exclude kns=nvjet)
    [[ $tool == none ]] && sanitizer=()
    timeout 300 "${sanitizer[@]}" "$RUN/experts_lab" \
      --ab-act-grad-staged --reps 1 --tokens $2 --hidden $3 --inter $4 --experts $5 --top-k $6 \
      >"$OUT/sanitizer_${1}_$tool.log" 2>&1
    rc=$?
    [[ $rc == 0 ]] || status=1
    printf '%-8s %-9s exit %s  %s | %s\n' "$1" "$tool" "$rc" \
      "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_${1}_$tool.log" | head -1)" \
      "$(grep -E 'AB verify' "$OUT/sanitizer_${1}_$tool.log" | tr -s ' ' | paste -sd';')" |
      tee -a "$OUT/sanitizer.log"
  done
done

step "the three shapes, $REPS rounds"
for c in "olmoe 16384 2048 1024 64 8" "qwen3 16384 2048 768 128 8" "small 8192 1024 4096 16 2"; do
  set -- $c
  echo "--- $1" >>"$OUT/lab_staged.txt"
  timeout 200 "$RUN/experts_lab" --ab-act-grad-staged --reps "$REPS" --tokens $2 --hidden $3 \
    --inter $4 --experts $5 --top-k $6 >>"$OUT/lab_staged.txt" 2>&1 || status=1
done

step "table"
grep -E "^--- |AB verify|B/A" "$OUT/lab_staged.txt"
exit $status
