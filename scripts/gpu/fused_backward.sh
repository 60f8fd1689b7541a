#!/usr/bin/env bash
# One GPU visit for the activation backward in the da GEMM's epilogue (issue 4: grouped_fused's
# backward writes dpre from the accumulators, never da). From the repository root on the GPU
# machine, with RUN staged by scripts/gpu/stage_run.sh plus the lab binary (bench/lab/
# experts_lab.cu's nvcc line) copied into RUN, and unpacked (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/fused_backward.sh RUN
# 1. experts_lab at the Qwen3 and OLMoE shapes, in alternating rounds, outputs checked equal:
#    --ab-act-grad: the plain da GEMM against the one with the activation backward in its
#    epilogue, that one against a variant prefetching pre into L2, then the whole experts backward
#    on grouped against grouped_fused (fresh dW, blocked w_up); --ab-wgrad: the weight gradients
#    written fresh against a pingpong 64x256 kernel, and fp32 against bf16 dW;
# 2. compute-sanitizer memcheck and racecheck on the fused tests;
# 3. scripts/gpu/layer_rounds.sh: every GPU test, then ours and the PyTorch peer alternating per
#    configuration.
# A visit brings back at most 8 files, so the logs come back packed in logs.tar.gz.
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
mkdir -p "$OUT"
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

for shape in "qwen3 768 128" "olmoe 1024 64"; do
  read -r name inter experts <<<"$shape"
  for mode in act-grad wgrad; do
    step "experts_lab --ab-$mode $name"
    timeout 150 "$RUN/experts_lab" --ab-$mode --reps 20 --tokens 16384 --hidden 2048 \
      --inter "$inter" --experts "$experts" --top-k 8 >"$OUT/lab_${mode}_$name.txt" 2>&1 || status=1
    grep -E "^AB|Disposition" "$OUT/lab_${mode}_$name.txt"
  done
done

step "compute-sanitizer on the fused tests"
filter='*FusedUpProjection*:GroupedGemmActGrad.*:GroupedGemmAct.*'
filter+=':*ForwardAndBackward*e6_two_n_tiles_grouped_fused*:*ForwardAndBackward*e5_empty*fused*'
sanitize_tests "$RUN" "$filter" "$OUT/sanitizer.log" 200 0 || status=1

step "layer rounds"
OUT=$OUT bash scripts/gpu/layer_rounds.sh "$RUN" || status=1
grep -B3 -A15 "Failure" "$OUT/tests.log" | head -60

(cd "$OUT" && tar -czf logs.tar.gz --remove-files tests.log sanitizer.log peer_layer.log \
  $(ls lab_*.txt 2>/dev/null))
exit $status
