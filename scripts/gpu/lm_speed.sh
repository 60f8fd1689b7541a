#!/usr/bin/env bash
# One GPU visit for the language model's speed (issue 5), from the repository root on the GPU
# machine with binaries staged by scripts/gpu/stage_run.sh:
#   OUT=/some/dir bash scripts/gpu/lm_speed.sh RUN
# Steps, each with its own time limit:
#   1. the GPU model's tests: every router against the CPU model, the layer kinds (tests.log)
#   2. ours, this build against an earlier one (RUN/moe-bench.old, if staged), alternating, on
#      ROUTERS (default "dense_params softmax_topk") for STEPS (default 150) steps
#   3. scripts/gpu/lm.sh PHASE=speed on the same routers: ours, then the PyTorch twin eager and
#      compiled (lm.tgz, summary.txt)
# Prints the speed lines last.
set -uo pipefail
RUN=${1:?usage: lm_speed.sh RUN}
OUT=${OUT:-out}
mkdir -p "$OUT"
source scripts/gpu/unpack_run.sh "$RUN"
ROUTERS=${ROUTERS:-dense_params softmax_topk}
STEPS=${STEPS:-150}
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/tests.log"
grep -o '"[0-9a-f]\{7,\}[^"]*"' "$RUN/generated/moe_build_info.hpp" | head -n 1 | sed 's/^/build /' | tee -a "$OUT/tests.log"

step "GPU model tests"
timeout 200 "$RUN/moe_cuda_tests" --gtest_brief=1 \
  --gtest_filter='*LmModel*:*LmLayers*:*LayerParity*:*LayerMemory*:*LayerGraph*:*Overwritten*' \
  >>"$OUT/tests.log" 2>&1 || status=1
grep -E "^\[  (FAILED|PASSED) |tests ran" "$OUT/tests.log" | tail -n 20
grep -B3 -A12 "Failure" "$OUT/tests.log" | head -n 60

if [[ -x $RUN/moe-bench.old ]]; then
  for r in $ROUTERS; do
    for bin in moe-bench.old moe-bench; do
      step "ours $r $bin"
      timeout 60 "$RUN/$bin" train --device gpu --router "$r" --steps "$STEPS" --eval-every 0 \
        >>"$OUT/old_new.log" 2>&1 || status=1
      grep -E "^speed" "$OUT/old_new.log" | tail -n 1 | sed "s/^/$r $bin: /" | tee -a "$OUT/speed.txt"
    done
  done
fi

if [[ -z ${NO_TWIN:-} ]]; then  # NO_TWIN=1: leave step 3 to a second call (600 s per call)
  step "ours and the twin (lm.sh PHASE=speed)"
  OUT="$OUT" PHASE=speed ROUTERS="$ROUTERS" STEPS="$STEPS" bash scripts/gpu/lm.sh "$RUN" \
    >"$OUT/lm_speed.log" 2>&1 || status=1
fi

step "summary"
cat "$OUT/speed.txt" 2>/dev/null
grep -E "^speed|tokens/s|exit" "$OUT/summary.txt" 2>/dev/null | tail -n 20
exit $status
