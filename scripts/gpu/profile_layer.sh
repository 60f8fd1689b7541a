#!/usr/bin/env bash
# One GPU visit that times every kernel of the whole MoE layer with Nsight Compute (issue 4): which
# of the small stages (gate, route, plan, permute, combine, the grouped GEMMs' prepare kernels)
# cost more than their bytes, and each GEMM's duration and DRAM traffic on its own. From the
# repository root on the GPU machine, with RUN staged by scripts/gpu/stage_run.sh and unpacked
# (source scripts/gpu/unpack_run.sh RUN):
#   CONFIGS="qwen3 olmoe" OUT=/some/dir bash scripts/gpu/profile_layer.sh RUN
# Per configuration, `moe-bench bench --layer` runs under ncu --clock-control none, which records
# gpu__time_duration and dram__bytes for the first LAUNCHES kernel launches (default 2500: the
# inference forwards, the training forward and the first forward+backward rounds); the bench's own
# timings in that run are not quoted (ncu serialises the launches). The table per configuration
# (kernel_table_<config>.txt, printed last) groups launches by kernel and launch shape.
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
CONFIGS=${CONFIGS:-qwen3 olmoe}
LAUNCHES=${LAUNCHES:-2500}
mkdir -p "$OUT"
export PATH="/usr/local/cuda/bin:$PATH"
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv |
  tee "$OUT/gpu.txt"
ncu --version | tail -n 1 | tee -a "$OUT/gpu.txt"

for c in $CONFIGS; do
  step "ncu: moe-bench bench --layer --config $c (first $LAUNCHES launches)"
  timeout 400 ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes.sum \
    --launch-count "$LAUNCHES" -f -o "$OUT/layer_$c" \
    "$RUN/moe-bench" bench --layer --config "$c" --reps 20 --warmup 3 >"$OUT/ncu_$c.log" 2>&1 ||
    { status=1; tail -n 5 "$OUT/ncu_$c.log"; continue; }
  ncu -i "$OUT/layer_$c.ncu-rep" --page raw --csv --kernel-name-base demangled >"$OUT/layer_$c.csv"
  python3 scripts/gpu/kernel_table.py "$OUT/layer_$c.csv" >"$OUT/kernel_table_$c.txt" || status=1
  rm -f "$OUT/layer_$c.ncu-rep"
  gzip -f "$OUT/layer_$c.csv"
done

(cd "$OUT" && tar -czf logs.tar.gz --remove-files $(ls ncu_*.log 2>/dev/null))
step "summary"
for c in $CONFIGS; do
  echo "--- $c"
  cat "$OUT/kernel_table_$c.txt" 2>/dev/null
done
exit $status
