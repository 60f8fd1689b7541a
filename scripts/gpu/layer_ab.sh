#!/usr/bin/env bash
# One GPU visit for a change to the layer's kernels against the build before it, from the
# repository root on the GPU machine with RUN staged by scripts/gpu/stage_run.sh (the new build,
# and the earlier moe-bench as an extra file named moe-bench-base) and unpacked
# (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/layer_ab.sh RUN
# 1. TESTS=1 (default): every GPU test, then compute-sanitizer (memcheck, racecheck) on
#    SANITIZE_FILTER (the grouped GEMMs and small experts cases by default); 2. per configuration
#    (CONFIGS), `moe-bench bench --layer` of the earlier build and of the new one in the order
#    A B B A, ROUNDS times; PEER=1 runs the PyTorch peer once per configuration after them; 3. a
#    table (layer_ab_table.py): new / earlier, per configuration, for the forward, its two GEMM
#    steps, the backward's GEMM steps, the forward+backward steps and their energy per run.
# Files under $OUT: gpu.txt tests.log sanitize.log layer_base.jsonl layer_new.jsonl
# peer_layer.jsonl bench.log table.txt
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
CONFIGS=${CONFIGS:-"olmoe qwen3 brief_small decode"}
ROUNDS=${ROUNDS:-1}
TESTS=${TESTS:-1}
PEER=${PEER:-0}
SANITIZE_FILTER=${SANITIZE_FILTER:-'GroupedGemm*:GroupedWgrad*:*e5_tail_halves*:*e64_small*'}
mkdir -p "$OUT"
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step device
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv |
  tee "$OUT/gpu.txt"

if ((TESTS)); then
  step "GPU tests"
  gpu_tests "$RUN" "$OUT/tests.log" 300 || status=1
  step "compute-sanitizer ($SANITIZE_FILTER)"
  sanitize_tests "$RUN" "$SANITIZE_FILTER" "$OUT/sanitize.log" 240 || status=1
fi

bench() {  # bench BINARY JSONL CONFIG
  timeout 150 "$1" bench --layer --reps 20 --warmup 3 --config "$3" --out "$2" \
    >>"$OUT/bench.log" 2>&1 || status=1
}
for round in $(seq "$ROUNDS"); do
  for c in $CONFIGS; do
    step "round $round: $c (earlier, new, new, earlier)"
    bench "$RUN/moe-bench-base" "$OUT/layer_base.jsonl" "$c"
    bench "$RUN/moe-bench" "$OUT/layer_new.jsonl" "$c"
    bench "$RUN/moe-bench" "$OUT/layer_new.jsonl" "$c"
    bench "$RUN/moe-bench-base" "$OUT/layer_base.jsonl" "$c"
  done
done
if ((PEER)); then
  for c in $CONFIGS; do
    step "peer: $c"
    timeout 90 python3 bench/peers/torch_moe_layer.py --build "$RUN" --reps 20 --warmup 3 \
      --config "$c" --out "$OUT/peer_layer.jsonl" >>"$OUT/bench.log" 2>&1 || status=1
  done
fi

step "table"
python3 scripts/gpu/layer_ab_table.py "$OUT" | tee "$OUT/table.txt"
exit $status
