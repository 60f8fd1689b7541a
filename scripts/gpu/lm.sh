#!/usr/bin/env bash
# One GPU visit for the language model (issue 5), from the repository root on the GPU machine,
# with binaries built on a CPU machine and staged by scripts/gpu/stage_run.sh:
#   OUT=/some/dir PHASE=check|compare bash scripts/gpu/lm.sh [RUN=build/lmrun]
# speed:   ours and the twin for STEPS steps per router of ROUTERS (REDUCE_OVERHEAD=1 adds the
#          twin compiled with mode reduce-overhead).
# check:   the GPU layer-kind, layer and model parity tests, compute-sanitizer on the small model
#          tests, then a short run of ours and of the PyTorch twin (eager and compiled) for speed.
# compare: `moe-bench compare --device gpu` for each seed of SEEDS (default 0 1 2), ROUTERS (a
#          comma-separated list) if given.
# twin:    the PyTorch twin (eager, compiled, compiled with CUDA graphs) on our GPU default
#          configuration: TWIN_FULL routers (default softmax_topk) over STEPS (default 2000) with
#          evaluations, TWIN_SPEED routers over SPEED_STEPS (default 150) for speed only; for each
#          seed of TWIN_SEEDS (default 0) and mode of TWIN_MODES (default "eager compile ro").
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

twin() {  # twin MODE ROUTER CONFIG_JSONL STEPS OUTFILE [more flags]
  local mode=$1 router=$2 cfg=$3 steps=$4 out=$5
  shift 5
  timeout "${TWIN_TIMEOUT:-300}" python3 bench/peers/torch_lm.py --mode "$mode" --router "$router" \
    --config-from "$cfg" --steps "$steps" --corpus data/corpus --build "$RUN" --out "$out" "$@" \
    >>"$W/twin.log" 2>&1
  echo "twin $mode $router $* exit $?" | tee -a "$OUT/summary.txt"
}

if [[ $PHASE == check ]]; then
  step "parity tests"
  timeout 150 "$RUN/moe_cuda_tests" --gtest_filter='*LmLayers*:*LayerParity*:*LayerGraph*:*LmModel*:*SoftMoe*:*ChainLayer*:*ExpertChoice*' \
    >"$W/tests.log" 2>&1
  echo "tests exit $?" | tee -a "$OUT/summary.txt"
  grep -E "^\[  (PASSED|FAILED) |FAILED  \]|tests ran" "$W/tests.log" | tail -30 | tee -a "$OUT/summary.txt"
  step "compute-sanitizer memcheck (small model and layer kinds)"
  MOE_TEST_SMALL=1 timeout 100 compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$RUN/moe_cuda_tests" --gtest_filter='*LmLayers*:*LmModelParity.TrainsLike*softmax*:*CublasAttention*' \
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

if [[ $PHASE == speed ]]; then
  # ours and the twin (eager, compiled, compiled with CUDA graphs) for STEPS steps per router
  for r in ${ROUTERS:-softmax_topk}; do
    step "speed: $r"
    timeout 120 "$BIN" train --device gpu --router "$r" --steps "${STEPS:-100}" --eval-every 0 \
      --jsonl "$W/ours_$r.jsonl" >"$W/ours_$r.log" 2>&1
    echo "ours $r exit $?" | tee -a "$OUT/summary.txt"
    grep "^speed" "$W/ours_$r.log" | tee -a "$OUT/summary.txt"
    twin eager "$r" "$W/ours_$r.jsonl" "${STEPS:-100}" "$W/twin_$r.jsonl" --eval-every 0
    twin compile "$r" "$W/ours_$r.jsonl" "${STEPS:-100}" "$W/twin_$r.jsonl" --eval-every 0
    if [[ -n ${REDUCE_OVERHEAD:-} ]]; then
      twin compile "$r" "$W/ours_$r.jsonl" "${STEPS:-100}" "$W/twin_ro_$r.jsonl" --eval-every 0 \
        --compile-mode reduce-overhead
    fi
    grep '"kind": "summary"' "$W"/twin_*"$r".jsonl | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line.split(":", 1)[1])
    print(r["peer"], r.get("compile_mode", ""), "%.0f tokens/s" % r["tokens_per_s"])' \
      | tee -a "$OUT/summary.txt"
  done
fi

if [[ $PHASE == compare ]]; then
  for seed in ${SEEDS:-0 1 2}; do
    step "ours: compare --device gpu --seed $seed"
    timeout "${COMPARE_TIMEOUT:-600}" "$BIN" compare --device gpu --seed "$seed" \
      ${STEPS:+--steps $STEPS} ${ROUTERS:+--routers $ROUTERS} --out "$W/compare_seed$seed" \
      >"$W/compare_seed$seed.log" 2>&1
    echo "compare seed $seed exit $?" | tee -a "$OUT/summary.txt"
    sed -n '/^model /,$p' "$W/compare_seed$seed.log" | head -9 | tee -a "$OUT/summary.txt"
  done
fi

if [[ $PHASE == twin ]]; then
  # The twin on our GPU default configuration (the config record of a 0-step run of ours):
  # TWIN_FULL routers over the full STEPS with evaluations (curves), TWIN_SPEED routers over
  # SPEED_STEPS without (tokens/s); each eager, compiled, and compiled with CUDA graphs.
  for r in ${TWIN_FULL:-softmax_topk} ${TWIN_SPEED:-}; do
    cfg="$W/config_$r.jsonl"
    "$BIN" train --device gpu --router "$r" --steps 0 --jsonl "$cfg" >/dev/null 2>&1
    if [[ " ${TWIN_FULL:-softmax_topk} " == *" $r "* ]]; then
      n=${STEPS:-2000}; extra=()
    else
      n=${SPEED_STEPS:-150}; extra=(--eval-every 0)
    fi
    for seed in ${TWIN_SEEDS:-0}; do
      for mode in ${TWIN_MODES:-eager compile ro}; do
        step "twin: $r, $n steps, seed $seed, $mode"
        case $mode in
          eager) twin eager "$r" "$cfg" "$n" "$W/twin_$r.jsonl" --seed "$seed" "${extra[@]}" ;;
          compile) twin compile "$r" "$cfg" "$n" "$W/twin_$r.jsonl" --seed "$seed" "${extra[@]}" ;;
          ro) twin compile "$r" "$cfg" "$n" "$W/twin_ro_$r.jsonl" --seed "$seed" \
                --compile-mode reduce-overhead "${extra[@]}" ;;
        esac
      done
    done
    python3 - "$W/twin_$r.jsonl" "$W/twin_ro_$r.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, os, sys
for path in sys.argv[1:]:
    if not os.path.exists(path):
        continue
    for line in open(path):
        r = json.loads(line)
        if r.get("kind") == "summary":
            print(os.path.basename(path), r["run"], r["peer"], "%.0f tokens/s" % r["tokens_per_s"],
                  "val %.4f" % r["val_bpb"])
PY
  done
fi
step done
tar -C "$W" -czf "$OUT/lm.tgz" .
