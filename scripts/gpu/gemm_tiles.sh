#!/usr/bin/env bash
# One GPU visit for the grouped GEMM's tile and cluster (issue 4): our GEMMs run at 78-83 % of
# cuBLAS's dense GEMMs at the Qwen3 shape, in one group as in 128 (experts_lab run5). From the
# repository root on the GPU machine, with RUN staged by scripts/gpu/stage_run.sh plus the lab
# binary (bench/lab/experts_lab.cu's nvcc line), unpacked (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/gemm_tiles.sh RUN
# 1. which kernels cuBLAS runs for the dense-equivalent GEMMs (bench/lab/cublas_kernels.py);
# 2. experts_lab forward rows at the Qwen3 and OLMoE shapes, with the lab-only tiles X6-X8 and
#    X11-X13 (each verified against the library's GEMM first).
# Files under $OUT: cublas_kernels.txt lab_qwen3.txt lab_olmoe.txt
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
mkdir -p "$OUT"
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step device
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader

step "cuBLAS's kernels"
timeout 120 python3 bench/lab/cublas_kernels.py >"$OUT/cublas_kernels.txt" 2>&1 || status=1
cat "$OUT/cublas_kernels.txt"

step "experts_lab (forward rows)"
for shape in "qwen3 768 128" "olmoe 1024 64"; do
  read -r name inter experts <<<"$shape"
  timeout 200 "$RUN/experts_lab" --no-backward --reps 20 --tokens 16384 --hidden 2048 \
    --inter "$inter" --experts "$experts" --top-k 8 >"$OUT/lab_$name.txt" 2>&1 || status=1
  grep -E "^(G1|G2|D1|D2|X[0-9]+) " "$OUT/lab_$name.txt"
done
exit $status
