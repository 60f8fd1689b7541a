#!/usr/bin/env bash
# One GPU visit (issue 4): the da GEMM with the activation backward, the library's kernel against
# the same kernel with each tile's pre prefetched into L2 by its auxiliary load warp
# (experts_lab --ab-act-grad-prefetch) at OLMoE, Qwen3 and the brief's small shape. From the
# repository root on the GPU machine, RUN staged by scripts/gpu/stage_run.sh with the lab binary
# and unpacked (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/da_prefetch.sh RUN
# Files under $OUT: gpu.txt clocks.csv lab_prefetch_<shape>.txt
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
for shape in "olmoe 16384 2048 1024 64 8" "qwen3 16384 2048 768 128 8" \
             "brief_small 8192 1024 4096 16 2"; do
  read -r name tokens hidden inter experts top_k <<<"$shape"
  step "experts_lab --ab-act-grad-prefetch $name"
  timeout 200 "$RUN/experts_lab" --ab-act-grad-prefetch --reps 20 --tokens "$tokens" \
    --hidden "$hidden" --inter "$inter" --experts "$experts" --top-k "$top_k" \
    >"$OUT/lab_prefetch_$name.txt" 2>&1 || status=1
  grep -E "^AB" "$OUT/lab_prefetch_$name.txt"
done
exit $status
