#!/usr/bin/env bash
# One GPU visit for the language model (issue 5), from the repository root on the GPU machine,
# with binaries built on a CPU machine and staged by scripts/gpu/stage_run.sh:
#   OUT=/some/dir PHASE=check|compare bash scripts/gpu/lm.sh [RUN=build/lmrun]
# check:   the GPU layer-kind, layer and model parity tests, compute-sanitizer on the small model
#          tests, then a short run of ours and of the PyTorch twin (eager and compiled) for speed.
# compare: `moe-bench compare --device gpu` for each seed of SEEDS (default 0 1 2), then the
#          PyTorch twin (eager and compiled) on the configuration of our run, for each router of
#          TWIN_ROUTERS (default softmax_topk) over TWIN_STEPS steps (default: the same steps).
# Everything goes to WORK (default /tmp/lm_work); $OUT gets summary.txt and lm.tgz (the folder
# packed: at most 8 files come back from a visit).
set -uo pipefail
RUN=${1:-build/lmrun}
OUT=${OUT:-out}
PHASE=${PHASE:-check}
W="${WORK:-/tmp/lm_work}"
mkdir -p "$W"
source scripts/gpu/unpack_run.sh "$RUN"
export PYTHONUNBUFFERED=1
BIN="$RUN/moe-bench"
step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)" | tee -a "$OUT/summary.txt"; }
step device
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv | tee "$W/gpu.txt" | tee -a "$OUT/summary.txt"
python3 -c 'import torch; print("torch", torch.__version__)' 2>&1 | tee -a "$OUT/summary.txt"

twin() {  # twin MODE ROUTER CONFIG_JSONL STEPS OUTFILE
  timeout "${TWIN_TIMEOUT:-300}" python3 bench/peers/torch_lm.py --mode "$1" --router "$2" \
    --config-from "$3" --steps "$4" --corpus data/corpus --out "$5" \
    >>"$W/twin.log" 2>&1
  echo "twin $1 $2 exit $?" | tee -a "$OUT/summary.txt"
}

if [[ $PHASE == check ]]; then
  step "parity tests"
  timeout 150 "$RUN/moe_cuda_tests" --gtest_filter='*LmLayers*:*LayerParity*:*LmModel*' \
    >"$W/tests.log" 2>&1
  echo "tests exit $?" | tee -a "$OUT/summary.txt"
  grep -E "^\[  (PASSED|FAILED) |FAILED  \]|tests ran" "$W/tests.log" | tail -30 | tee -a "$OUT/summary.txt"
  step "compute-sanitizer memcheck (small model and layer kinds)"
  MOE_TEST_SMALL=1 timeout 100 compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$RUN/moe_cuda_tests" --gtest_filter='*LmLayers*:LmModelParity/*TrainsLike*softmax*' \
    >"$W/sanitizer.log" 2>&1
  echo "memcheck exit $?" | tee -a "$OUT/summary.txt"
  tail -3 "$W/sanitizer.log" | tee -a "$OUT/summary.txt"
  step "ours: short GPU run"
  timeout 90 "$BIN" train --device gpu --router softmax_topk --steps "${STEPS:-100}" \
    --eval-every 0 --jsonl "$W/ours_short.jsonl" >"$W/ours_short.log" 2>&1
  echo "ours exit $?" | tee -a "$OUT/summary.txt"
  tail -12 "$W/ours_short.log" | tee -a "$OUT/summary.txt"
  step "twin: short runs"
  twin eager softmax_topk "$W/ours_short.jsonl" "${STEPS:-100}" "$W/twin_short.jsonl"
  twin compile softmax_topk "$W/ours_short.jsonl" "${STEPS:-100}" "$W/twin_short.jsonl"
  tail -20 "$W/twin.log" | tee -a "$OUT/summary.txt"
fi

if [[ $PHASE == compare ]]; then
  for seed in ${SEEDS:-0 1 2}; do
    step "ours: compare --device gpu --seed $seed"
    timeout "${COMPARE_TIMEOUT:-600}" "$BIN" compare --device gpu --seed "$seed" \
      ${STEPS:+--steps $STEPS} --out "$W/compare_seed$seed" >"$W/compare_seed$seed.log" 2>&1
    echo "compare seed $seed exit $?" | tee -a "$OUT/summary.txt"
    sed -n '/^model /,$p' "$W/compare_seed$seed.log" | head -12 | tee -a "$OUT/summary.txt"
  done
  first=$(ls "$W"/compare_seed*/compare.jsonl 2>/dev/null | head -1)
  for r in ${TWIN_ROUTERS:-softmax_topk}; do
    step "twin: $r"
    cfg="$W/config_$r.jsonl"
    grep "\"kind\":\"config\"" "$first" | grep "\"run\":\"$r\"" | head -1 >"$cfg"
    for mode in eager compile; do
      twin "$mode" "$r" "$cfg" "${TWIN_STEPS:-${STEPS:-1000}}" "$W/twin_$r.jsonl"
    done
  done
  tail -30 "$W/twin.log" | tee -a "$OUT/summary.txt"
fi
step done
tar -C "$W" -czf "$OUT/lm.tgz" .
