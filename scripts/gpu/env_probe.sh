#!/usr/bin/env bash
# Experiment (experts lab Version 18): `bench --layer` in alternating rounds under environment
# settings that the experimental kernels read (SETTINGS: space-separated, each VAR=VALUE[+VAR=VALUE];
# "-" for none), after the GPU tests run under each non-empty setting. From the repository root on
# the GPU machine, RUN unpacked:
#   OUT=/some/dir SETTINGS="- MOE_RASTER=N" bash scripts/gpu/env_probe.sh RUN
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
CONFIGS=${CONFIGS:-"olmoe qwen3 brief_small"}
SETTINGS=${SETTINGS:?settings}
ROUNDS=${ROUNDS:-2}
TEST_FILTER=${TEST_FILTER:-'*Grouped*:*Layer*:*Experts*'}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv | tee "$OUT/gpu.txt"
envs() { [[ $1 == - ]] || tr '+' '\n' <<<"$1"; }
for s in $SETTINGS; do
  [[ $s == - ]] && continue
  echo "=== tests under $s" | tee -a "$OUT/tests.log"
  env $(envs "$s") timeout 300 "$RUN/moe_cuda_tests" --gtest_brief=1 --gtest_filter="$TEST_FILTER" \
    >>"$OUT/tests.log" 2>&1; echo "rc $?" | tee -a "$OUT/tests.log"
  grep -E "^\[  (PASSED|FAILED) " "$OUT/tests.log" | tail -2
done
for round in $(seq "$ROUNDS"); do
  for c in $CONFIGS; do
    for s in $SETTINGS; do
      echo "=== round $round config $c setting $s" >>"$OUT/probe.log"
      env $(envs "$s") timeout 60 "$RUN/moe-bench" bench --layer --reps 20 --warmup 3 \
        --config "$c" >>"$OUT/probe.log" 2>&1 || echo "failed: $c $s"
    done
  done
done
python3 scripts/gpu/probe_table.py "$OUT/probe.log" | tee "$OUT/table.txt"
