#!/usr/bin/env bash
# One GPU visit for the grouped GEMMs without a cluster (issue 4): experts_lab run 6 found the
# plain down-projection 10-14 % faster on a 1x1 cluster than on the 2x1 one; this measures the
# library's other kernels the same way. From the repository root on the GPU machine, with RUN
# staged by scripts/gpu/stage_run.sh plus the lab binary (bench/lab/experts_lab.cu's nvcc line),
# unpacked (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/cluster_lab.sh RUN
# experts_lab with the backward rows at the Qwen3 and OLMoE shapes: G1 / G2 (the plain GEMMs, now
# 1x1) against X12 (2x1), N1 / N2 (the backward's (N, K) GEMMs, 2x1) against X14 / X15 (1x1),
# W1 / W2 against X16 / X17, G3 / G3n against X18 / X18n. Files under $OUT: lab_qwen3.txt
# lab_olmoe.txt
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
mkdir -p "$OUT"
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step device
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
for shape in "qwen3 768 128" "olmoe 1024 64"; do
  read -r name inter experts <<<"$shape"
  step "experts_lab $name"
  timeout 280 "$RUN/experts_lab" --reps 20 --tokens 16384 --hidden 2048 --inter "$inter" \
    --experts "$experts" --top-k 8 >"$OUT/lab_$name.txt" 2>&1 || status=1
  grep -E "^(G1|G2|G3|G3n|N1|N2|W1|W2|W1o|W2o|D1|D2|F1|F3|B1|B1o|X1[2-8]n?) |verify|relative" \
    "$OUT/lab_$name.txt" | grep -v "^verify .*e+00$" | head -60
done
exit $status
