#!/usr/bin/env bash
# The test command: install what is missing, configure (release preset), build on every core,
# run every test. CUDA tests compile wherever nvcc is found and skip at runtime without a GPU.
#   bash scripts/test.sh               (MOE_PRESET=cpu-only for a build without CUDA)
# The last line is a plain count: "tests: N passed, N failed, N skipped".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

preset=${MOE_PRESET:-release}
jobs=$(nproc 2>/dev/null || echo 2)

bash scripts/setup.sh
cmake --preset "$preset"
cmake --build --preset "$preset" --parallel "$jobs"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
ctest --preset "$preset" --output-on-failure --parallel "$jobs" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e

# ctest counts skipped tests as passed; report them apart.
total=$(sed -nE 's/.* tests? failed out of ([0-9]+).*/\1/p' "$log" | tail -n 1)
failed=$(sed -nE 's/.*passed, ([0-9]+) tests? failed out of.*/\1/p' "$log" | tail -n 1)
skipped=$(grep -cE '^[[:space:]]+[0-9]+ - .*\((Skipped|Disabled)\)$' "$log" || true)
if [[ -n $total && -n $failed ]]; then
  echo "tests: $((total - failed - skipped)) passed, $failed failed, $skipped skipped"
fi
exit "$rc"
