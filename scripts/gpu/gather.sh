#!/usr/bin/env bash
# One GPU visit for the gathered up-projection (issue 4): the permute folded into the grouped
# GEMM's loader. From the repository root on the GPU machine, with RUN staged by
# scripts/gpu/stage_run.sh (and unpacked: source scripts/gpu/unpack_run.sh RUN):
#   OUT=/some/dir bash scripts/gpu/gather.sh RUN
# 1. every GPU test (the gathered GEMM against the plain one bit for bit, the inference layer
#    against the training layer's y in every LayerParity case), 2. compute-sanitizer memcheck and
#    racecheck on the gathered GEMM's test, 3. bench --layer (training and inference forward,
#    forward+backward) at the issue's configurations, 4. the PyTorch peer at the same ones, then a
#    short table. Files under $OUT: gpu.txt tests.log sanitizer.log layer.jsonl layer_bench.log
#    peer_layer.jsonl peer_layer.log
set -uo pipefail
RUN=${1:?run folder}
OUT=${OUT:-out}
CONFIGS=${CONFIGS:-"olmoe qwen3 mixtral brief_small decode qwen3_32k"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests

step device
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv | tee "$OUT/gpu.txt"

step "GPU tests"
gpu_tests "$RUN" "$OUT/tests.log" || status=1

step "compute-sanitizer on the gathered GEMM"
sanitize_tests "$RUN" 'GroupedGemm.Gathered*' "$OUT/sanitizer.log" 120 0 || status=1

step "moe-bench bench --layer"
for c in $CONFIGS; do
  timeout 45 "$RUN/moe-bench" bench --layer --reps 20 --warmup 3 --config $c \
    --out "$OUT/layer.jsonl" >>"$OUT/layer_bench.log" 2>&1 || status=1
  echo "$c exit $?"
done

step "PyTorch peer"
# shellcheck disable=SC2086
timeout 240 python3 bench/peers/torch_moe_layer.py --build "$RUN" --reps 20 --warmup 3 \
  --config $CONFIGS --out "$OUT/peer_layer.jsonl" >"$OUT/peer_layer.log" 2>&1 || status=1
tail -n 12 "$OUT/peer_layer.log"

step "table"
python3 - "$OUT/layer.jsonl" "$OUT/peer_layer.jsonl" <<'PY'
import json, sys
ours = {}
for l in open(sys.argv[1]):
    d = json.loads(l); ours[d["config"]] = d
peer = {}
try:
    for l in open(sys.argv[2]):
        d = json.loads(l)
        if d.get("impl", "grouped_mm") in ("grouped_mm", "torch_grouped_mm"): peer[d["config"]] = d
except FileNotFoundError:
    pass
print(f"{'config':<12} {'train':>7} {'permuted':>8} {'gathered':>8} {'rows':>8} {'peer':>7} "
      f"{'inf x':>6} {'%dense':>6} {'fb fresh':>8} {'peer fb':>8} {'fb x':>5} {'floor x':>7}")
for c, d in ours.items():
    p = peer.get(c, {})
    pf, pb = p.get("forward_ms", float("nan")), p.get("fwd_bwd_fresh_ms", float("nan"))
    print(f"{c:<12} {d['forward_ms']:7.3f} {d['inference_permuted_ms']:8.3f} "
          f"{d['inference_gathered_ms']:8.3f} {d['inference_rows']:>8} {pf:7.3f} "
          f"{pf / d['inference_ms']:6.2f} {100 * d['inference_fraction_of_dense']:6.1f} "
          f"{d['fwd_bwd_fresh_ms']:8.3f} {pb:8.3f} {pb / d['fwd_bwd_fresh_ms']:5.2f} "
          f"{d['inference_over_weight_floor']:7.2f}")
PY
exit $status
