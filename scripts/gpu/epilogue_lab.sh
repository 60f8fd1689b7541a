#!/usr/bin/env bash
# One GPU visit for the plain grouped GEMMs' epilogue (issue 4): the library's (C declared and never
# read, 2 D buffers) against no C with 4 or 8 D buffers, on the down-projection and dxp, in
# alternating rounds with outputs checked equal first (experts_lab --ab-epilogue), at the Qwen3
# and OLMoE shapes. From the repository root on the GPU machine, with RUN staged by
# scripts/gpu/stage_run.sh plus build/gg/experts_lab (bench/lab/experts_lab.cu's nvcc line), and
# unpacked (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/epilogue_lab.sh RUN
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
mkdir -p "$OUT"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
for shape in "qwen3 768 128" "olmoe 1024 64"; do
  read -r name inter experts <<<"$shape"
  printf '\n=== experts_lab --ab-epilogue %s (%s)\n' "$name" "$(date -u +%H:%M:%S)"
  timeout 200 "$RUN/experts_lab" --ab-epilogue --reps 20 --tokens 16384 --hidden 2048 \
    --inter "$inter" --experts "$experts" --top-k 8 >"$OUT/lab_epilogue_$name.txt" 2>&1 || status=1
  grep -E "^AB|Disposition" "$OUT/lab_epilogue_$name.txt"
done
exit $status
