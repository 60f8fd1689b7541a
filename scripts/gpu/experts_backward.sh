#!/usr/bin/env bash
# One GPU visit for the fresh (overwritten) expert weight gradients and the new GPU layers
# (issues 4 and 5), from the repository root on the GPU machine with binaries staged by
# scripts/gpu/stage_run.sh (plus experts_lab, built with the nvcc line at the top of
# bench/lab/experts_lab.cu, copied into the run folder):
#   OUT=/some/dir scripts/gpu/experts_backward.sh RUN
# Steps, each with its own time limit:
#   1. device; GPU tests: experts and grouped GEMMs (overwritten gradients from NaN), the layer,
#      chain-of-experts and soft-MoE layers, their CUDA graphs, and the LM against the CPU model
#      (tests.log)
#   2. experts_lab at OLMoE and Qwen3 with the backward (lab_olmoe.txt, lab_qwen3.txt)
#   3. scripts/gpu/layer.sh: moe-bench bench --layer and the PyTorch peer (layer/)
#   4. the LM's step time against an earlier build (RUN/moe-bench.old), when one is staged
# Prints a short table last.
set -uo pipefail
RUN=${1:?usage: experts_backward.sh RUN}
OUT=${OUT:-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$RUN/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/tests.log"
grep -o '"[0-9a-f]\{7,\}[^"]*"' "$RUN/generated/moe_build_info.hpp" | head -n 1 | sed 's/^/build /' | tee -a "$OUT/tests.log"

PARTS=${PARTS:-12}  # 1: tests and lab, 2: layer benchmark and LM speed (two calls fit 600 s each)
if [[ $PARTS == *1* ]]; then
step "GPU tests"
timeout 240 "$RUN/moe_cuda_tests" --gtest_brief=1 \
  --gtest_filter='*Experts*:*Grouped*:*FusedUpProjection*:*LayerParity*:*LayerGraph*:*ChainLayer*:*SoftMoe*:*LmModel*:*LmLayers*' \
  >>"$OUT/tests.log" 2>&1 || status=1
grep -E "^\[  (FAILED|PASSED) |tests ran" "$OUT/tests.log" | tail -n 20
grep -B3 -A10 "Failure" "$OUT/tests.log" | head -n 80

for shape in "olmoe:" "qwen3:--inter 768 --experts 128"; do
  name=${shape%%:*}
  step "experts_lab $name"
  # shellcheck disable=SC2086
  timeout 60 "$RUN/experts_lab" ${shape#*:} >"$OUT/lab_$name.txt" 2>&1 || status=1
  grep -E "^(G1|G2|W1|W2|W1o|W2o|P2|F1|B1|B1o|D1|D2|D3|D4) " "$OUT/lab_$name.txt"
done

fi
if [[ $PARTS == *2* ]]; then
step "layer benchmark and peer"
OUT="$OUT/layer" bash scripts/gpu/layer.sh "$RUN" >"$OUT/layer_visit.log" 2>&1 || status=1
grep -E "^layer |^peer " "$OUT/layer/layer_bench.log" "$OUT/layer/peer_layer.log" | cut -c1-220
# a visit returns at most 8 files: the layer folder travels as one archive
tar -C "$OUT" -czf "$OUT/layer.tgz" layer && rm -rf "$OUT/layer"

# 4. The LM's step time, this build against an earlier one ($RUN/moe-bench.old, if staged) on the
#    same card, alternating: dense_params (the dense FFN's activation kernels) and softmax_topk.
if [[ -x $RUN/moe-bench.old ]]; then
  source scripts/gpu/unpack_run.sh "$RUN"
  for round in 1; do
    for r in dense_params softmax_topk; do
      for bin in moe-bench.old moe-bench; do
        step "LM speed $r $bin (round $round)"
        timeout 90 "$RUN/$bin" train --device gpu --router "$r" --steps 60 --eval-every 0 \
          >"$OUT/lm_${r}_${bin}_$round.log" 2>&1 || status=1
        grep -E "^speed|tokens/s" "$OUT/lm_${r}_${bin}_$round.log" | tail -n 2
      done
    done
  done
fi
fi

step "summary"
grep -E "^\[  (FAILED|PASSED) " "$OUT/tests.log"
shopt -s nullglob
for f in "$OUT"/lab_*.txt; do echo "$(basename "$f"): $(grep -E '^(W1 |W1o|W2 |W2o|B1 |B1o)' "$f" | awk '{printf "%s %s  ", $1, $(NF-1)}')"; done
exit $status
