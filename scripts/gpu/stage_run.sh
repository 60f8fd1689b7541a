#!/usr/bin/env bash
# CPU side of a GPU visit: copy what the GPU machine runs into one small folder that travels with
# the working tree (the device tool's `carry`, 64 MiB in all, tracked files included):
#   bash scripts/gpu/stage_run.sh BUILD RUN [EXTRA...]
#   e.g. bash scripts/gpu/stage_run.sh build/gg build/lmrun build/gg/experts_lab
# RUN gets generated/moe_build_info.hpp (the git revision the peers record) and payload.tar.xz:
# the binaries (moe-bench, moe_cuda_tests and the EXTRA files, e.g. a lab), the shared libraries
# the GPU machine's image lacks (fmt, OpenBLAS and its Fortran runtime, see bundle_libs.sh) and the
# corpus (data/corpus), compressed because together they are larger than what may travel.
# scripts/gpu/unpack_run.sh undoes it there.
set -euo pipefail
BUILD=${1:?build folder}
RUN=${2:?run folder}
shift 2
bash "$(dirname "${BASH_SOURCE[0]}")/bundle_libs.sh" "$BUILD" >/dev/null
rm -rf "$RUN"
mkdir -p "$RUN/generated"
cp "$BUILD/generated/moe_build_info.hpp" "$RUN/generated/"
[[ -f data/corpus/MD5SUMS ]] || { echo "stage_run: data/corpus missing (bash scripts/setup.sh --corpus)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/lib" "$tmp/data" "$tmp/bin"
cp "$BUILD/moe-bench" "$BUILD/moe_cuda_tests" "$@" "$tmp/bin/"
cp -L "$BUILD"/lib/* "$tmp/lib/"
cp -r data/corpus "$tmp/data/"
tar -C "$tmp" -cf - bin lib data | xz -T0 -6 >"$RUN/payload.tar.xz"
du -sh "$RUN"
