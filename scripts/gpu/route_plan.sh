#!/usr/bin/env bash
# GPU visits for the router's top-k in registers and the plan's parallel column scan (issue 4:
# the small stages of the forward), from the repository root on the GPU machine with RUN staged
# by scripts/gpu/stage_run.sh and unpacked (source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/route_plan.sh RUN check    (about 5 minutes)
#   OUT=/some/dir bash scripts/gpu/route_plan.sh RUN rounds   (about 5 minutes)
# check:  every GPU test; compute-sanitizer memcheck and racecheck on the route, plan and layer
#         parity tests (small cases: the ticket counters and the register top-k); ncu --set full
#         on one launch each of the router's and the plan's kernels in the Qwen3 layer; the
#         kernel table of that layer under ncu (scripts/gpu/profile_layer.sh).
# rounds: scripts/gpu/layer_rounds.sh (ours and the PyTorch peer alternating per configuration)
#         without its tests; CONFIGS as there, default the issue's six.
# Each mode packs its logs into logs_<mode>.tar.gz (a visit brings back at most 8 files).
# check's settings: KERNELS (the kernel-name regexes profiled with --set full), NCU_CONFIG (their
# layer, default qwen3), PROFILE_CONFIGS (the kernel tables', default qwen3).
set -uo pipefail
RUN=${1:?run folder}
MODE=${2:?check or rounds}
OUT=${OUT:-out}
mkdir -p "$OUT"
export PATH="/usr/local/cuda/bin:$PATH"
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

if [[ $MODE == check ]]; then
  step "GPU tests (all)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  gpu_tests "$RUN" "$OUT/tests.log" 280 || status=1

  step "compute-sanitizer on route, plan and layer parity (small cases)"
  filter='*RouteTopK*:*RouteParity*:*RouteDeterminism*:*PlanParity*:*PlanExpertChoice*'
  filter+=':*LayerParity*e6*'
  sanitize_tests "$RUN" "$filter" "$OUT/sanitizer.log" 150 || status=1

  # The router's and the plan's kernels one launch each, --set full: where their time goes
  # (speed of light, warp states, the SASS lines with the most stall samples).
  for k in ${KERNELS:-route_topk_kernel route_partial_kernel plan_scan_kernel plan_scatter_kernel}; do
    step "ncu --set full: $k"
    timeout 120 ncu --clock-control none --set full --import-source no -k "regex:$k" -s 5 -c 1 \
      -f -o "$OUT/ncu_$k" "$RUN/moe-bench" bench --layer --config "${NCU_CONFIG:-qwen3}" \
      --reps 20 --warmup 3 \
      >"$OUT/ncu_${k}_run.log" 2>&1 || { status=1; tail -n 3 "$OUT/ncu_${k}_run.log"; continue; }
    {
      ncu -i "$OUT/ncu_$k.ncu-rep" --page details 2>&1
      echo "--- SASS lines with the most warp stall samples"
      ncu -i "$OUT/ncu_$k.ncu-rep" --page source --csv --print-source sass 2>&1 |
        python3 scripts/gpu/stall_lines.py 30
    } >"$OUT/ncu_$k.txt"
    rm -f "$OUT/ncu_$k.ncu-rep" "$OUT/ncu_${k}_run.log"
    grep -E "^ +Duration|Warp Cycles Per Issued|Issue Slots Busy|Achieved Occupancy" "$OUT/ncu_$k.txt"
  done

  step "kernel table (ncu)"
  CONFIGS=${PROFILE_CONFIGS:-qwen3} LAUNCHES=${LAUNCHES:-1800} OUT=$OUT \
    bash scripts/gpu/profile_layer.sh "$RUN" >"$OUT/profile.log" 2>&1 || status=1
  grep -E "route|plan_|prepare|permute|gather_sum|gate|nvjet|combine" "$OUT"/kernel_table_*.txt
  (cd "$OUT" && tar -czf logs_check.tar.gz --remove-files tests.log sanitizer.log profile.log \
    $(ls logs.tar.gz ncu_*.txt 2>/dev/null))
elif [[ $MODE == rounds ]]; then
  CONFIGS=${CONFIGS:-"olmoe qwen3 qwen3_32k mixtral brief_small decode"} TEST_FILTER='-*' \
    OUT=$OUT bash scripts/gpu/layer_rounds.sh "$RUN" || status=1
  (cd "$OUT" && tar -czf logs_rounds.tar.gz --remove-files tests.log peer_layer.log)
else
  echo "route_plan.sh: mode must be check or rounds, got '$MODE'" >&2
  exit 2
fi
exit $status
