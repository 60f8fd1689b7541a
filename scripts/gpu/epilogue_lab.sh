#!/usr/bin/env bash
# One GPU visit for lab variants of the grouped GEMMs (issue 4: their store epilogues, the gathered
# loader's cluster), in alternating rounds with outputs checked equal first, at the Qwen3 and
# OLMoE shapes. From the repository root on the GPU machine,
# with RUN staged by scripts/gpu/stage_run.sh plus build/gg/experts_lab (bench/lab/experts_lab.cu's
# nvcc line), and unpacked (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/epilogue_lab.sh RUN
# MODES (default --ab-epilogue): experts_lab modes to run, each at both shapes:
#   --ab-epilogue        the plain GEMMs (down, dxp): the builder's epilogue (a C never read, 2 D
#                        buffers) against no C with 4 or 8 D buffers
#   --ab-wgrad-epilogue  fresh dW, fp32 and bf16, against no C with 4 D buffers
#   --ab-gather          the gathered fused up-projection: the library's 2x1 cluster against 1x1
# TESTS=1 runs every GPU test first (tests.log).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests
RUN=${1:?run folder}
OUT=${OUT:-out}
MODES=${MODES:---ab-epilogue}
mkdir -p "$OUT"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
if [[ ${TESTS:-0} == 1 ]]; then
  step "GPU tests (all)"
  gpu_tests "$RUN" "$OUT/tests.log" 280 || status=1
fi
for mode in $MODES; do
  for shape in "qwen3 768 128" "olmoe 1024 64"; do
    read -r name inter experts <<<"$shape"
    step "experts_lab $mode $name"
    timeout 200 "$RUN/experts_lab" "$mode" --reps 20 --tokens 16384 --hidden 2048 \
      --inter "$inter" --experts "$experts" --top-k 8 >"$OUT/lab_${mode#--ab-}_$name.txt" 2>&1 ||
      status=1
    grep -E "^AB|Disposition" "$OUT/lab_${mode#--ab-}_$name.txt"
  done
done
exit $status
