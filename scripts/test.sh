#!/usr/bin/env bash
# The test command: install what is missing, configure (release preset), build on every core,
# run every test. CUDA tests compile wherever nvcc is found and skip at runtime without a GPU.
#   bash scripts/test.sh               (MOE_PRESET=cpu-only for a build without CUDA)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

preset=${MOE_PRESET:-release}
jobs=$(nproc 2>/dev/null || echo 2)

bash scripts/setup.sh
cmake --preset "$preset"
cmake --build --preset "$preset" --parallel "$jobs"
ctest --preset "$preset" --output-on-failure --parallel "$jobs"
