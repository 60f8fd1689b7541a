#!/usr/bin/env bash
# One GPU visit (issue 4): the da GEMM with the activation backward, the library's kernel against
# 128x128 tiles whose activation backward runs on a warpgroup of its own under the next tile's
# mainloop (experts_lab --ab-act-grad-split), at OLMoE, Qwen3, the brief's small shape and the
# grid's T 4096 E 16 point, after memcheck and racecheck of that kernel at a small shape. From the
# repository root on the GPU machine, RUN staged by scripts/gpu/stage_run.sh with the lab binary
# and unpacked (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/da_split.sh RUN
# Files under $OUT: gpu.txt clocks.csv small.txt memcheck.txt racecheck.txt lab_split_<shape>.txt
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
mkdir -p "$OUT"
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step

step device
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu \
  --format=csv,noheader,nounits -lms 200 >"$OUT/clocks.csv" 2>/dev/null &
sampler=$!
trap 'kill $sampler 2>/dev/null' EXIT
small=(--tokens 600 --hidden 256 --inter 384 --experts 8 --top-k 2 --reps 1)
step "experts_lab --ab-act-grad-split at 600 256 384 8 2 (a hang stops the visit here)"
timeout 30 stdbuf -oL "$RUN/experts_lab" --ab-act-grad-split "${small[@]}" >"$OUT/small.txt" 2>&1
rc=$?
grep -E "^AB" "$OUT/small.txt"
[[ $rc == 0 ]] || { echo "small run: exit $rc"; exit 1; }
for tool in memcheck racecheck; do
  step "compute-sanitizer --tool $tool, the split kernel at 600 256 384 8 2"
  timeout 150 compute-sanitizer --tool "$tool" "$RUN/experts_lab" --ab-act-grad-split "${small[@]}" \
    >"$OUT/$tool.txt" 2>&1 || status=1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|AB verify|Hazard" "$OUT/$tool.txt" | head -8
done
for shape in "olmoe 16384 2048 1024 64 8" "qwen3 16384 2048 768 128 8" \
             "brief_small 8192 1024 4096 16 2" "grid_T4096_E16 4096 1024 4096 16 2"; do
  read -r name tokens hidden inter experts top_k <<<"$shape"
  step "experts_lab --ab-act-grad-split $name"
  timeout 60 stdbuf -oL "$RUN/experts_lab" --ab-act-grad-split --reps 20 --tokens "$tokens" \
    --hidden "$hidden" --inter "$inter" --experts "$experts" --top-k "$top_k" \
    >"$OUT/lab_split_$name.txt" 2>&1 || status=1
  grep -E "^AB" "$OUT/lab_split_$name.txt"
done
exit $status
