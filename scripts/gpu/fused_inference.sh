#!/usr/bin/env bash
# One GPU visit for the inference layout (issue 4): SwiGLU in the up-projection's epilogue with
# w_up's pairs in GateUpLayout::blocked order, so act is stored with no exchange between lanes and
# no pre is written. From the repository root on the GPU machine, with RUN staged by
# scripts/gpu/stage_run.sh plus the lab binary (bench/lab/experts_lab.cu's nvcc line) copied into
# RUN, and unpacked (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/fused_inference.sh RUN
# 1. experts_lab at the Qwen3 and OLMoE shapes, forward rows only (G3b / F3b against G1, G3n, F1,
#    F3n; each backend verified against the others first), and at Qwen3's FLOPs in one group
#    (E = 1: the grouped kernel without per-expert switches, against the same dense cuBLAS GEMMs);
# 2. compute-sanitizer memcheck and racecheck on the fused up-projection's tests;
# 3. scripts/gpu/layer_rounds.sh: every GPU test, then ours and the PyTorch peer alternating per
#    configuration (bench --layer's headline inference is now the blocked fused layout).
# LAB=0 skips step 1. A visit brings back at most 8 files, so the logs (tests, sanitizer, peer,
# lab) come back packed in logs.tar.gz; the JSONL, clocks and bench log stay plain.
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
LAB=${LAB:-1}
mkdir -p "$OUT"
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

lab() {  # name, then experts_lab options
  local name=$1; shift
  timeout 150 "$RUN/experts_lab" --no-backward --reps 20 "$@" >"$OUT/lab_$name.txt" 2>&1 || status=1
  grep -E "^verify|^(G1|G3|G3n|G3b|G2|P2|D1|D2|F1|F3|F3n|F3b) " "$OUT/lab_$name.txt"
}
if [[ $LAB == 1 ]]; then
  step "experts_lab (forward rows)"
  lab qwen3 --tokens 16384 --hidden 2048 --inter 768 --experts 128 --top-k 8
  lab olmoe --tokens 16384 --hidden 2048 --inter 1024 --experts 64 --top-k 8
  lab e1 --tokens 131072 --hidden 2048 --inter 768 --experts 1 --top-k 1
fi

step "compute-sanitizer on the fused up-projection and the blocked layout"
filter='*FusedUpProjection*:GateUpLayout.*:*ForwardAndBackward*e6_two_n_tiles_grouped*blocked'
filter+=':*ForwardAndBackward*e64_small_segments_grouped*blocked:GroupedGemmAct.*'
sanitize_tests "$RUN" "$filter" "$OUT/sanitizer.log" 200 0 || status=1

step "layer rounds"
OUT=$OUT bash scripts/gpu/layer_rounds.sh "$RUN" || status=1
grep -B3 -A15 "Failure" "$OUT/tests.log" | head -60

(cd "$OUT" && tar -czf logs.tar.gz --remove-files tests.log sanitizer.log peer_layer.log \
  $(ls lab_*.txt 2>/dev/null))
exit $status
