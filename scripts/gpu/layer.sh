#!/usr/bin/env bash
# One GPU visit for the whole layer (issue 4), from the repository root on the GPU machine with a
# build made beforehand on a CPU machine (see scripts/gpu/data_path.sh for the build and
# scripts/gpu/bundle_libs.sh for the bundled libraries):
#   OUT=/some/dir scripts/gpu/layer.sh [BUILD=build/gg]
# Runs, each under its own time limit: the layer parity tests, `moe-bench bench --layer` one
# configuration at a time (a failure leaves the others), then the PyTorch peer.
# Files under $OUT: gpu.txt test_layer.log layer.jsonl layer_bench.log peer_layer.jsonl
# peer_layer.log
set -uo pipefail
BUILD=${1:-build/gg}
OUT=${OUT:-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$BUILD/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
source "$(dirname "${BASH_SOURCE[0]}")/visit.sh"  # step, gpu_tests, sanitize_tests
step device
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv | tee "$OUT/gpu.txt"
step "layer parity tests"
timeout 60 "$BUILD/moe_cuda_tests" --gtest_filter='*LayerParity*' >"$OUT/test_layer.log" 2>&1
echo "exit $?"; grep -E "rel\. Frobenius|PASSED|FAILED|OK \]" "$OUT/test_layer.log"
step "moe-bench bench --layer"
for c in olmoe qwen3 mixtral brief_small; do
  timeout 35 "$BUILD/moe-bench" bench --layer --reps 20 --warmup 3 --config $c \
    --out "$OUT/layer.jsonl" >>"$OUT/layer_bench.log" 2>&1
  echo "$c exit $?"
done
cat "$OUT/layer_bench.log"
step "PyTorch peer"
timeout 150 python3 bench/peers/torch_moe_layer.py --build "$BUILD" --reps 20 --warmup 3 \
  --out "$OUT/peer_layer.jsonl" >"$OUT/peer_layer.log" 2>&1
echo "exit $?"; cat "$OUT/peer_layer.log"
step done
