#!/usr/bin/env bash
# One GPU visit (issue 4): every GPU test, then experts_lab --ab at the Qwen3 and OLMoE shapes --
# the library's grouped GEMMs against lab variants (1x1 cluster, a 128x192 tile) in alternating
# rounds, the method run 7 called for. From the repository root on the GPU machine, with RUN
# staged by scripts/gpu/stage_run.sh plus the lab binary (bench/lab/experts_lab.cu's nvcc line),
# unpacked (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/ab_lab.sh RUN
# Files under $OUT: gpu.txt tests.log lab_ab_qwen3.txt lab_ab_olmoe.txt
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
mkdir -p "$OUT"
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step device
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
step "GPU tests"
gpu_tests "$RUN" "$OUT/tests.log" 200 || status=1
for shape in "qwen3 768 128" "olmoe 1024 64"; do
  read -r name inter experts <<<"$shape"
  step "experts_lab --ab $name"
  timeout 200 "$RUN/experts_lab" --ab --reps 20 --tokens 16384 --hidden 2048 --inter "$inter" \
    --experts "$experts" --top-k 8 >"$OUT/lab_ab_$name.txt" 2>&1 || status=1
  grep -E "^AB|Disposition" "$OUT/lab_ab_$name.txt"
done
exit $status
