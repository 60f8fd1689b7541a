#!/usr/bin/env bash
# Build the kernel labs (bench/lab/*.cu) against an existing CMake build's libraries:
#   scripts/gpu/build_lab.sh [BUILD=build/gpu] [OUTDIR=BUILD]
set -euo pipefail
BUILD=${1:-build/gpu}
OUTDIR=${2:-$BUILD}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
# The CUTLASS headers the build was configured with, and its generated headers (revision).
CUTLASS=$(sed -n 's/^MOE_CUTLASS_INCLUDE:PATH=//p' "$BUILD/CMakeCache.txt")
CUTLASS=${CUTLASS:-.deps/python/cutlass_library/source/include}
[[ -f $CUTLASS/cute/tensor.hpp ]] || { echo "build_lab: no CUTLASS headers in $CUTLASS" >&2; exit 2; }
mkdir -p "$OUTDIR"
for lab in bench/lab/*.cu; do
  name=$(basename "$lab" .cu)
  "$NVCC" -std=c++20 -O3 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a \
    -Iinclude -Isrc -I"$CUTLASS" -I"$BUILD/generated" "$lab" -o "$OUTDIR/$name" \
    "$BUILD/libmoe_cuda.a" "$BUILD/libmoe.a" -lcublas -lcublasLt
  echo "built $OUTDIR/$name"
done
