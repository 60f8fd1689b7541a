#!/usr/bin/env bash
# Experiment (experts lab Version 17): the da GEMM's and the fresh fp32 weight gradients' CTAs
# started out of step, so that their epilogues' memory bursts do not all fall together. Each
# setting is MOE_DA_STAGGER / MOE_DW_STAGGER = "ns,groups": CTA c waits (c % groups) * ns once,
# before its first epilogue. From the repository root on the GPU machine, RUN unpacked:
#   OUT=/some/dir bash scripts/gpu/stagger_probe.sh RUN
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
CONFIGS=${CONFIGS:-"olmoe qwen3 brief_small"}
SETTINGS=${SETTINGS:-"0,1/0,1 15000,2/0,1 8000,2/0,1 20000,2/0,1 8000,4/0,1 0,1/15000,2"}
ROUNDS=${ROUNDS:-2}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv | tee "$OUT/gpu.txt"
for round in $(seq "$ROUNDS"); do
  for c in $CONFIGS; do
    for s in $SETTINGS; do
      echo "=== round $round config $c setting $s" >>"$OUT/stagger.log"
      MOE_DA_STAGGER=${s%/*} MOE_DW_STAGGER=${s#*/} timeout 60 "$RUN/moe-bench" bench --layer \
        --reps 20 --warmup 3 --config "$c" >>"$OUT/stagger.log" 2>&1 || echo "failed: $c $s"
    done
  done
done
python3 scripts/gpu/stagger_table.py "$OUT/stagger.log"
