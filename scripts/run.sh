#!/usr/bin/env bash
# The main job: install what is missing, build (release preset), then compare every router on
# one layer. Arguments go to `moe-bench compare` (e.g. --layout padded --jsonl results.jsonl).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs=$(nproc 2>/dev/null || echo 2)
bash scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release --parallel "$jobs" --target moe-bench
build/release/moe-bench compare "$@"
