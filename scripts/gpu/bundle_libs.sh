#!/usr/bin/env bash
# Copy the shared libraries our binaries need that the GPU machine's image may lack (fmt,
# OpenBLAS and its Fortran runtime from Debian) into BUILD/lib; data_path.sh puts that folder on
# LD_LIBRARY_PATH. CUDA and C/C++ runtime libraries are left to the GPU machine.
set -euo pipefail
BUILD=${1:-build/gpu}
mkdir -p "$BUILD/lib"
for bin in "$BUILD/moe-bench" "$BUILD/moe_cuda_tests"; do
  [[ -x $bin ]] || continue
  ldd "$bin" | awk '/=> \// {print $3}' | while read -r lib; do
    case $(basename "$lib") in
      libcuda*|libcublas*|libc.so*|libm.so*|libstdc++*|libgcc_s*|libdl.so*|libpthread*|librt.so*) ;;
      *) cp -Lu "$lib" "$BUILD/lib/" ;;
    esac
  done
done
ls "$BUILD/lib"
